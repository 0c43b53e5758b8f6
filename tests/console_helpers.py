"""A tiny FastAPI app around the console router, as console/app.py mounts it, for the tests."""

from __future__ import annotations

import functools
import threading
import time

from fastapi import FastAPI

from console.auth import hash_password
from console.web import build_router

PASSWORDS = {"viewer": "viewer-pw-1", "operator": "operator-pw-1", "admin": "admin-pw-1"}


@functools.cache
def users_toml() -> str:
    """[[console.users]] for one user of each role, named after the role."""
    return "".join(f'[[console.users]]\nname = "{role}"\nrole = "{role}"\npassword_hash = "{hash_password(pw)}"\n'
                   for role, pw in PASSWORDS.items())


def console_app(settings, **kwargs) -> FastAPI:
    app = FastAPI(title="medsam2-cxr console (test app)")
    app.include_router(build_router(settings, **kwargs))
    return app


class Served:
    """The app served by uvicorn on a port in a thread (for the browser)."""

    def __init__(self, app: FastAPI, port: int) -> None:
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                                    access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{port}"

    def __enter__(self) -> Served:
        self.thread.start()
        end = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > end:
                raise AssertionError("the console did not start within 20 s")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
