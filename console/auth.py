"""Who may use the console: logins against argon2 hashes, signed session cookies, roles, CSRF
tokens and lockout after repeated failures.

- Users come from the configuration (``[[console.users]]`` name, role, password_hash); hashes are
  argon2id (``python -m console.auth hash-password``). No users: nobody can log in.
- A session is a cookie signed with HMAC-SHA256 under the session secret (``[console]
  session_secret``, or a key the node made in ``<spool>/secrets/session.key``): it names the
  user, role, expiry and the session's CSRF token. HttpOnly, SameSite=Strict, Secure over TLS.
  Logging out revokes the session id in this process.
- Roles: viewer (reads) < operator (+ resend) < admin (+ patient identifiers on demand).
- Every POST carries the session's CSRF token, in the form field ``csrf`` or the header
  ``X-CSRF-Token``; the login form carries a signed token of its own (login CSRF).
- ``lockout_failures`` failed logins of one user name, or from one address, within
  ``lockout_window_s`` lock that user or address for ``lockout_s``; the lockout is audited.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

ROLES = {"viewer": 0, "operator": 1, "admin": 2}
SESSION_COOKIE = "medsam2_session"
LOGIN_COOKIE = "medsam2_login"
CSRF_FIELD = "csrf"
CSRF_HEADER = "X-CSRF-Token"

_hasher = PasswordHasher()
# Verified when the user name is unknown, so that a wrong name costs as long as a wrong password.
_DUMMY = _hasher.hash(secrets.token_hex(16))


def hash_password(password: str) -> str:
    """The argon2id hash to put in ``[[console.users]] password_hash``."""
    if not password:
        raise ValueError("an empty password cannot be hashed for the console")
    return _hasher.hash(password)


def role_allows(role: str, needed: str) -> bool:
    return ROLES.get(role, -1) >= ROLES[needed]


@dataclass(frozen=True)
class Session:
    sid: str
    user: str
    role: str
    csrf: str
    expires: float


class LoginRefused(Exception):
    """A login that did not succeed; ``locked`` when a lockout refused it before any check."""

    def __init__(self, message: str, locked: bool = False) -> None:
        super().__init__(message)
        self.locked = locked


class Signer:
    """``base64url(json).base64url(HMAC-SHA256)`` tokens with an expiry."""

    def __init__(self, key: bytes, purpose: str) -> None:
        self._key = hmac.new(key, purpose.encode(), hashlib.sha256).digest()  # one key per purpose

    def sign(self, payload: dict) -> str:
        body = base64.urlsafe_b64encode(json.dumps(payload, sort_keys=True).encode()).rstrip(b"=")
        mac = base64.urlsafe_b64encode(hmac.new(self._key, body, hashlib.sha256).digest()).rstrip(b"=")
        return (body + b"." + mac).decode()

    def unsign(self, token: str | None, now: float) -> dict | None:
        if not token or token.count(".") != 1 or len(token) > 4096:
            return None
        body, mac = token.encode("ascii", "replace").split(b".")
        want = base64.urlsafe_b64encode(hmac.new(self._key, body, hashlib.sha256).digest()).rstrip(b"=")
        if not hmac.compare_digest(mac, want):
            return None
        try:
            payload = json.loads(base64.urlsafe_b64decode(body + b"=" * (-len(body) % 4)))
        except ValueError:
            return None
        if not isinstance(payload, dict) or not isinstance(payload.get("exp"), (int, float)) or payload["exp"] < now:
            return None
        return payload


class Lockout:
    """Failed logins per user name and per address in a sliding window; too many lock that key."""

    def __init__(self, failures: int, window_s: float, lockout_s: float, clock: Callable[[], float] = time.monotonic):
        self.failures, self.window_s, self.lockout_s = max(1, int(failures)), window_s, lockout_s
        self._clock = clock
        self._seen: dict[str, deque[float]] = {}
        self._until: dict[str, float] = {}
        self._lock = threading.Lock()

    @staticmethod
    def keys(user: str, address: str) -> tuple[str, str]:
        return f"user:{user}", f"address:{address}"

    def locked(self, user: str, address: str) -> list[str]:
        """The keys (user, address) locked now."""
        now = self._clock()
        with self._lock:
            return [k for k in self.keys(user, address) if self._until.get(k, 0) > now]

    def failed(self, user: str, address: str) -> list[str]:
        """Count a failure; returns the keys this failure locked."""
        now = self._clock()
        newly = []
        with self._lock:
            for k in self.keys(user, address):
                seen = self._seen.setdefault(k, deque())
                seen.append(now)
                while seen and seen[0] < now - self.window_s:
                    seen.popleft()
                if len(seen) >= self.failures and self._until.get(k, 0) <= now:
                    self._until[k] = now + self.lockout_s
                    seen.clear()
                    newly.append(k)
            if len(self._seen) > 10000:  # many addresses: forget those with nothing in the window
                for k in [k for k, s in self._seen.items() if not s or s[-1] < now - self.window_s]:
                    del self._seen[k]
        return newly

    def succeeded(self, user: str) -> None:
        with self._lock:
            self._seen.pop(f"user:{user}", None)


class Auth:
    """Logins and sessions for one console process.

    Parameters
    ----------
    users : mapping of name -> (role, argon2 hash)
    key : bytes
        The session secret.
    audit : callable(event, **fields)
        Where logins, failures and lockouts are recorded (dicom_node.audit.AuditLog.record).
    """

    def __init__(self, users: dict[str, tuple[str, str]], key: bytes, audit: Callable[..., None],
                 session_s: float = 8 * 3600, lockout: Lockout | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.users = dict(users)
        self.session_s = session_s
        self.lockout = lockout or Lockout(5, 900, 900)
        self._audit = audit
        self._clock = clock
        self._sessions = Signer(key, "session")
        self._login_forms = Signer(key, "login-form")
        self._revoked: dict[str, float] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, console, key: bytes, audit: Callable[..., None], clock: Callable[[], float] = time.time,
                      monotonic: Callable[[], float] = time.monotonic) -> Auth:
        users = {u.name: (u.role, u.password_hash) for u in console.users}
        return cls(users, key, audit, session_s=console.session_hours * 3600,
                   lockout=Lockout(console.lockout_failures, console.lockout_window_s, console.lockout_s, monotonic),
                   clock=clock)

    # -- logging in ------------------------------------------------------------------------
    def login(self, user: str, password: str, address: str) -> tuple[Session, str]:
        """Check a login; returns the session and its cookie value, or raises LoginRefused.
        Audits the login, the failure (never the password) and a lockout it causes."""
        user = (user or "")[:128]
        locked = self.lockout.locked(user, address)
        if locked:
            self._audit("login_failed", user=user, address=address, reason="locked out",
                        locked=[k.split(":", 1)[0] for k in locked])
            raise LoginRefused("too many failed logins: try again later", locked=True)
        role, hashed = self.users.get(user, (None, _DUMMY))
        try:
            ok = _hasher.verify(hashed, password or "") and role is not None
        except (VerificationError, InvalidHashError):
            ok = False
        if not ok:
            self._audit("login_failed", user=user, address=address,
                        reason="unknown user" if role is None else "wrong password")
            for k in self.lockout.failed(user, address):
                kind = k.split(":", 1)[0]
                self._audit("login_locked", user=user, address=address, locked=kind,
                            failures=self.lockout.failures, window_s=self.lockout.window_s,
                            lockout_s=self.lockout.lockout_s)
            raise LoginRefused("wrong user name or password")
        self.lockout.succeeded(user)
        assert role is not None  # ok above: a known user
        session = Session(sid=secrets.token_urlsafe(16), user=user, role=role, csrf=secrets.token_urlsafe(24),
                          expires=self._clock() + self.session_s)
        self._audit("login", user=user, role=role, address=address)
        return session, self._sessions.sign({"sid": session.sid, "user": user, "role": role, "csrf": session.csrf,
                                             "exp": session.expires})

    def session(self, cookie: str | None) -> Session | None:
        """The session a cookie holds: signed by us, not expired, not logged out, its user still
        configured with the same role."""
        payload = self._sessions.unsign(cookie, self._clock())
        if payload is None:
            return None
        try:
            s = Session(sid=str(payload["sid"]), user=str(payload["user"]), role=str(payload["role"]),
                        csrf=str(payload["csrf"]), expires=float(payload["exp"]))
        except (KeyError, TypeError, ValueError):
            return None
        with self._lock:
            if s.sid in self._revoked:
                return None
        if self.users.get(s.user, (None,))[0] != s.role:
            return None
        return s

    def logout(self, session: Session, address: str) -> None:
        now = self._clock()
        with self._lock:
            self._revoked = {sid: exp for sid, exp in self._revoked.items() if exp > now}
            self._revoked[session.sid] = session.expires
        self._audit("logout", user=session.user, address=address)

    # -- the login form's own CSRF token ----------------------------------------------------
    def login_form_token(self) -> str:
        return self._login_forms.sign({"n": secrets.token_urlsafe(16), "exp": self._clock() + 3600})

    def login_form_ok(self, cookie: str | None, field: str | None) -> bool:
        return bool(cookie and field and hmac.compare_digest(cookie, field)
                    and self._login_forms.unsign(cookie, self._clock()) is not None)


def csrf_ok(session: Session, token: str | None) -> bool:
    return bool(token) and hmac.compare_digest(session.csrf.encode(), str(token).encode())


def main(argv: list[str] | None = None) -> int:
    """``python -m console.auth hash-password``: read a password (twice, not echoed), print its hash."""
    import getpass

    argv = sys.argv[1:] if argv is None else argv
    if argv != ["hash-password"]:
        print("usage: python -m console.auth hash-password", file=sys.stderr)
        return 2
    if sys.stdin.isatty():
        first, second = getpass.getpass("Password: "), getpass.getpass("Again: ")
        if first != second:
            print("the two passwords differ", file=sys.stderr)
            return 1
    else:
        first = sys.stdin.readline().rstrip("\n")
    try:
        print(hash_password(first))
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
