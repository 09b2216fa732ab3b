"""Console administrators: removing them, their passwords, their sessions, and
the brake on password guessing (failed logins per source address).

Adding one is `service.add_admin`, which `sender-filter init` and `admin add`
share with the console.
"""

import logging
import time

from peewee import fn
from werkzeug.security import generate_password_hash

from appliance import addresses
from appliance import service
from appliance.models import Admin
from appliance.models import ApplianceState
from appliance.models import LoginFailure
from appliance.models import db

log = logging.getLogger(__name__)

SHORTEST_PASSWORD = 10


def remove_admin(username, *, actor):
    """Delete an administrator and end their sessions; never the last one."""
    with db.atomic():
        admin = Admin.get_or_none(Admin.username == username)
        if admin is None:
            raise service.Refused(f"there is no administrator {username}")
        if Admin.select().count() <= 1:
            raise service.Refused(
                f"{username} is the last administrator; add another one first"
            )
        admin.delete_instance()
        end_sessions(username)
        service.audit(actor, "admin remove", username)
    log.info("%s removed by %s", username, actor)


def password_problem(password):
    """Why a new password will not do, or None: too short, or only spaces."""
    if len(password) < SHORTEST_PASSWORD:
        return f"a password has at least {SHORTEST_PASSWORD} characters"
    if not password.strip():
        return "a password of only spaces is no password"
    return None


def name_taken(username):
    """The administrator whose name is `username` in any case, or None."""
    return Admin.get_or_none(fn.LOWER(Admin.username) == username.lower())


def change_password(username, password, *, actor):
    """Set an administrator's password; every session they had ends."""
    problem = password_problem(password)
    if problem:
        raise service.Refused(problem)
    with db.atomic():
        admin = Admin.get_or_none(Admin.username == username)
        if admin is None:
            raise service.Refused(f"there is no administrator {username}")
        admin.password_hash = generate_password_hash(password)
        admin.save()
        ended = end_sessions(username)
        service.audit(actor, "admin password", username, "password changed")
    log.info("%s: password changed by %s", username, actor)
    return ended


def end_sessions(username, now=None):
    """Void every session cookie the administrator holds; returns the cut-off."""
    now = time.time() if now is None else now
    service.publish_state(**{f"logout:{username}": now})
    return now


def sessions_ended_at(username):
    """When the administrator's sessions were last ended (older cookies are void)."""
    row = ApplianceState.get_or_none(ApplianceState.key == f"logout:{username}")
    return float(row.value) if row else 0.0


def login_source(remote_address, ipv6_prefix=64):
    """The source failed logins are counted for: the address, or its IPv6 /64."""
    try:
        network = addresses.sender_of(remote_address or "", ipv6_prefix)
    except addresses.AddressError:
        return str(remote_address or "unknown")[:64]
    return addresses.sender_text(network)


def login_wait(source, failures, minutes, now=None):
    """Seconds `source` must wait before trying again: 0 when it may try now.

    A source that failed `failures` times within the last `minutes` is refused
    until the oldest of those failures is `minutes` old.
    """
    now = time.time() if now is None else now
    recent = (
        LoginFailure.select(LoginFailure.ts)
        .where((LoginFailure.source == source) & (LoginFailure.ts > now - minutes * 60))
        .order_by(LoginFailure.ts.desc())
        .limit(failures)
    )
    stamps = [row.ts for row in recent]
    if len(stamps) < failures:
        return 0
    return max(0, stamps[-1] + minutes * 60 - now)


def record_login_failure(source, minutes, username="", failures=None, now=None):
    """Count a failed login from `source`, in the sender filtering log too.

    Failures older than the lock-out go. When this failure is the `failures`th
    within `minutes`, the log also says the source is now locked out.
    """
    now = time.time() if now is None else now
    tried = f"as {username[:64]!r}" if username else "without a name"
    with db.atomic():
        LoginFailure.delete().where(LoginFailure.ts <= now - minutes * 60).execute()
        LoginFailure.create(source=source, ts=now)
        service.audit("console", "login failed", source, tried)
        if failures is not None and login_wait(source, failures, minutes, now):
            service.audit(
                "console",
                "login lockout",
                source,
                f"{failures} failed logins in {minutes} min: refused for {minutes} min",
            )


def forget_login_failures(source):
    """A successful login clears its source's failures."""
    with db.atomic():
        LoginFailure.delete().where(LoginFailure.source == source).execute()
