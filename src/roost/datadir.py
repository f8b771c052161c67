"""The node's data directory and the private files in it (store, generated admin password).

The store holds queued messages and the admin password file is a credential, so the directory
is created 0700 and these files 0600: readable by the broker's own user only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import stat
from pathlib import Path

from roost.config import Config, ConfigError

log = logging.getLogger("roost")

ADMIN_PASSWORD_FILE = "admin.password"


def ensure_data_dir(path: str | os.PathLike[str]) -> Path:
    """Create the data directory (0700, parents as usual) if it does not exist."""
    d = Path(path)
    if not d.is_dir():
        d.mkdir(parents=True, mode=0o700, exist_ok=True)
    return d


def private_file(path: Path) -> None:
    """Make sure ``path`` exists and only its owner can read it (a file we made earlier with
    looser bits is tightened; one owned by someone else is left alone)."""
    if not path.exists():
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        return
    st = path.stat()
    if st.st_mode & 0o077 and st.st_uid == os.geteuid():
        with contextlib.suppress(OSError):
            os.chmod(path, stat.S_IMODE(st.st_mode) & 0o600)


def admin_password_path(config: Config) -> Path:
    """Where the ``admin`` user's password lives when ``api.users`` does not set it."""
    if config.api.admin_password_file:
        return Path(config.api.admin_password_file)
    return Path(config.node.data_dir) / ADMIN_PASSWORD_FILE


def read_admin_password(path: Path) -> str | None:
    """The first line of the password file, or None when it cannot be read or is empty."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    pw = lines[0].strip() if lines else ""
    return pw or None


def admin_password(config: Config) -> str:
    """The ``admin`` password for a node whose ``api.users`` has no admin: from
    ``api.admin_password_file``, else from the data directory, where it is generated on first
    start. Raises ConfigError when a configured file cannot be read."""
    path = admin_password_path(config)
    pw = read_admin_password(path)
    if pw is not None:
        return pw
    if config.api.admin_password_file:
        raise ConfigError(f"api.admin_password_file: cannot read a password from {path}")
    ensure_data_dir(path.parent)
    pw = secrets.token_urlsafe(18)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:  # another process made it meanwhile (or it is empty): use it
        existing = read_admin_password(path)
        if existing is None:
            raise ConfigError(f"{path}: empty admin password file; delete it or fill it") from None
        return existing
    with os.fdopen(fd, "w") as f:
        f.write(pw + "\n")
    log.warning(
        "generated a password for the management API user admin in %s (readable by this user"
        " only; roost ctl reads it there). Set api.users or api.admin_password_file to choose"
        " one.",
        path.resolve(),
    )
    return pw
