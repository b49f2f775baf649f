"""Where each NATS user's password comes from.

Environment first (MENDERS_NATS_PASSWORD_<USER>: systemd EnvironmentFile,
container secrets), then the credentials file that `menders up` writes, mode
0600, in its state directory for the loopback server it started.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from bus_schemas import catalog
from bus_schemas.errors import MendersError
from bus_schemas.natsconf import password_env

FILE_NAME = "credentials.json"


class CredentialsError(MendersError, RuntimeError):
    pass


def generate() -> dict[str, str]:
    users = [*catalog.ACTORS, catalog.OPERATOR, catalog.ADMIN]
    # nats-server parses an environment variable's value as config, so a password
    # that starts with a digit or '-' would be read as a number: start with letters.
    return {u: "mp" + secrets.token_hex(24) for u in users}


def write(home: Path, passwords: dict[str, str], url: str) -> Path:
    home.mkdir(parents=True, exist_ok=True)
    path = home / FILE_NAME
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump({"url": url, "passwords": passwords}, fh)
    return path


def read_file(home: Path) -> dict[str, object]:
    try:
        data = json.loads((home / FILE_NAME).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def password_for(user: str, home: Path) -> str:
    if value := os.environ.get(password_env(user)):
        return value
    passwords = read_file(home).get("passwords")
    if isinstance(passwords, dict) and isinstance(passwords.get(user), str):
        return str(passwords[user])
    raise CredentialsError(
        f"no NATS password for user {user!r}: set {password_env(user)} "
        f"or start the stack with `menders up` (which writes {home / FILE_NAME})"
    )


def url_from(home: Path, configured: str) -> str:
    """The URL to reach NATS: $MENDERS_NATS_URL, the running `menders up`, then config."""
    if value := os.environ.get("MENDERS_NATS_URL"):
        return value
    url = read_file(home).get("url")
    return url if isinstance(url, str) and url else configured


def env_for(user: str, passwords: dict[str, str]) -> dict[str, str]:
    return {password_env(user): passwords[user]}
