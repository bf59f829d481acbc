"""One-time enrollment tokens: how a device that holds no certificate yet proves the operator expects it.

The operator mints a token for one client id; the device presents it once, with its CSR. Only the token's
sha256 is kept (``tokens.json`` in the PKI directory), so a copy of that file enrolls nobody. A token is
spent, or refused, under the PKI lock, so two devices racing with the same token cannot both succeed.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import secrets
from dataclasses import dataclass
from pathlib import Path

from fedge.files import write_file
from fedge.security import pki

DEFAULT_TTL = dt.timedelta(hours=24)
_FILE = "tokens.json"


class TokenError(Exception):
    """A token cannot be used; ``code`` is the API's stable error code."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


@dataclass(frozen=True)
class TokenRecord:
    client: str
    expires_at: float
    used_at: float | None = None


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check(record: TokenRecord | None, now: float) -> None:
    """Why a token may not be redeemed now, as a ``TokenError``; nothing when it may."""
    if record is None:
        raise TokenError("invalid_token", "this enrollment token is not known")
    if record.used_at is not None:
        raise TokenError("token_used", "this enrollment token was already used")
    if now >= record.expires_at:
        raise TokenError("token_expired", "this enrollment token has expired")


def mint(pki_dir: Path, client: str, ttl: dt.timedelta = DEFAULT_TTL, now: float | None = None) -> str:
    """A new token for ``client``; refused while that id holds a valid certificate (revoke it first)."""
    pki.check_id(client, "client id")
    pki.federation_of(pki_dir)
    if ttl <= dt.timedelta(0):
        raise pki.PKIError("the token's time to live must be positive")
    if client in pki.active(pki_dir, pki.Role.CLIENT):
        raise TokenError(
            "client_active", f"client {client!r} holds a valid certificate: revoke it before re-enrolling"
        )
    token = secrets.token_urlsafe(32)
    moment = dt.datetime.now(dt.UTC).timestamp() if now is None else now
    with pki.locked(pki_dir):
        records = _load(pki_dir)
        records[digest(token)] = TokenRecord(client, moment + ttl.total_seconds())
        _save(pki_dir, records)
    return token


def redeem(pki_dir: Path, token: str, now: float | None = None) -> str:
    """Spend ``token`` and return the client id it was minted for."""
    moment = dt.datetime.now(dt.UTC).timestamp() if now is None else now
    key = digest(token)
    with pki.locked(pki_dir):
        records = _load(pki_dir)
        record = records.get(key)
        check(record, moment)
        assert record is not None
        records[key] = TokenRecord(record.client, record.expires_at, moment)
        _save(pki_dir, records)
    return record.client


def _load(pki_dir: Path) -> dict[str, TokenRecord]:
    path = pki_dir / _FILE
    if not path.exists():
        return {}
    return {key: TokenRecord(**value) for key, value in json.loads(path.read_text()).items()}


def _save(pki_dir: Path, records: dict[str, TokenRecord]) -> None:
    data = {key: vars(record) for key, record in records.items()}
    write_file(pki_dir / _FILE, json.dumps(data, indent=1).encode(), private=True)
