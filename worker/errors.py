"""The node's own errors: one root, so a caller can tell "ours, with a message for a person" from a bug.

``Medsam2Error`` is the root; each subclass names one kind of failure a person can fix. Library
code raises them; only the command line (worker/cli/) turns them into a message and an exit code.
"""

from __future__ import annotations


class Medsam2Error(Exception):
    """Something the node cannot do, said in a message that names the file or key and what to do."""


class ConfigError(Medsam2Error):
    """The configuration (TOML file or MEDSAM2_CXR_* environment) cannot be read or is invalid.

    The command line prints the message to stderr and exits with code 1."""

    exit_code = 1
