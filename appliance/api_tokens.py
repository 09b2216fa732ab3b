"""API tokens: who may call /api/v1/. Only a SHA-256 hash of a token is stored.

A token is 256 random bits, so a plain (unsalted, fast) hash is as safe to keep
as a password hash would be, and it lets a token be found by its hash.
"""

import hashlib
import logging
import re
import secrets
import time

from peewee import IntegrityError

from appliance import service
from appliance.models import ApiToken
from appliance.models import db

log = logging.getLogger(__name__)

TOKEN_PREFIX = "sf_"
LONGEST_TOKEN = 128
LAST_USED_EVERY = 60.0
TOKEN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class TokenError(Exception):
    """A token name that is malformed, taken, or unknown."""


def ensure_table():
    """Create the token table when the database does not have it yet."""
    db.create_tables([ApiToken], safe=True)


def token_hash(token):
    """The stored form of a token: its SHA-256 as hex."""
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(name, actor="cli"):
    """Add a token called `name`; returns the token itself, shown only this once."""
    if not TOKEN_NAME.fullmatch(name or ""):
        raise TokenError(
            "a token name is 1 to 64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)

    ensure_table()
    try:
        with db.atomic():
            ApiToken.create(name=name, token_hash=token_hash(token))
            service.audit(actor, "token add", name)
    except IntegrityError as exc:
        raise TokenError(f"API token {name} already exists") from exc

    log.info("%s: API token added by %s", name, actor)
    return token


def verify_token(token, now=None):
    """The ApiToken a presented token belongs to, or None; notes when it was used."""
    if not token or len(token) > LONGEST_TOKEN:
        return None
    found = ApiToken.get_or_none(ApiToken.token_hash == token_hash(token))
    if found is None:
        return None

    now = time.time() if now is None else now
    if found.last_used is None or now - found.last_used >= LAST_USED_EVERY:
        ApiToken.update(last_used=now).where(ApiToken.id == found.id).execute()
        found.last_used = now
    return found


def revoke_token(name, actor="cli"):
    """Delete the token called `name`; it stops working at once."""
    with db.atomic():
        deleted = ApiToken.delete().where(ApiToken.name == name).execute()
        if deleted:
            service.audit(actor, "token revoke", name)
    if not deleted:
        raise TokenError(f"no API token is called {name}")
    log.info("%s: API token revoked by %s", name, actor)


def list_tokens():
    """Every token by name (hashes only; the tokens themselves are not kept)."""
    return list(ApiToken.select().order_by(ApiToken.name))
