"""The HTTP API's bearer token and bind address (specs/http-api.md), without importing trio.

The token lives in ``<home>/http.token`` (mode 0600, 32 random bytes as hex), made the first
time a node starts with ``--http`` or ``crdtbook token`` asks for it. Whoever holds it can trade
with the node's key: it guards every trading and private request on every address, loopback
included, since any local user (or a web page in a local browser) can reach a loopback port.
The CLI imports this module, so it stays free of the server's dependencies.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import secrets
from pathlib import Path
from typing import Final

__all__ = [
    "DEFAULT_HTTP_HOST",
    "TOKEN_BYTES",
    "TOKEN_FILE",
    "check_token",
    "is_loopback",
    "load_or_create_token",
    "parse_bind",
]

TOKEN_FILE: Final = "http.token"
#: 256 bits: as strong as the node's ed25519 key it stands in for over HTTP.
TOKEN_BYTES: Final = 32
#: ``--http PORT`` alone binds here: reachable from this machine only.
DEFAULT_HTTP_HOST: Final = "127.0.0.1"


def load_or_create_token(home: Path) -> str:
    """The token in ``<home>/http.token``, created (0600, exclusively) when absent. A file
    that others can read is tightened to 0600; one that does not hold a token is refused
    (``ValueError``) rather than silently replaced, since scripts may already use it."""
    path = Path(home) / TOKEN_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)
        token = path.read_text().strip()
        if len(token) != 2 * TOKEN_BYTES or not all(c in "0123456789abcdef" for c in token):
            raise ValueError(
                f"{path} does not hold a token ({2 * TOKEN_BYTES} hex digits); delete it to "
                "make a new one (clients using the old one will need the new one)"
            ) from None
        return token
    token = secrets.token_hex(TOKEN_BYTES)
    try:
        os.write(fd, (token + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return token


def check_token(expected: str, given: str | None) -> bool:
    """Whether ``given`` is the token (compared in constant time)."""
    return given is not None and hmac.compare_digest(expected.encode(), given.strip().encode())


def parse_bind(text: str) -> tuple[str, int]:
    """``[HOST:]PORT`` (IPv6 as ``[::1]:8080``) as (host, port); ``ValueError`` otherwise.
    Port 0 asks the system for a free port (the node prints the one it got)."""
    text = text.strip()
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = DEFAULT_HTTP_HOST, text
    host = host.strip("[]") or DEFAULT_HTTP_HOST
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"--http {text!r}: expected [HOST:]PORT, e.g. 127.0.0.1:8080") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"--http {text!r}: port must be in 0..65535")
    return host, port


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable only from this machine (a loopback address or name)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost: may resolve anywhere
        return False
