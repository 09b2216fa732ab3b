"""Administrator login and logout, and the guard that keeps every page behind it."""

import logging
import math
import time
from urllib.parse import urlsplit

from flask import Blueprint
from flask import current_app
from flask import flash
from flask import g
from flask import has_request_context
from flask import redirect
from flask import render_template
from flask import request
from flask import session
from flask import url_for
from flask.sessions import SecureCookieSessionInterface
from werkzeug.security import check_password_hash
from werkzeug.security import generate_password_hash

from appliance import admins
from appliance import service
from appliance.models import Admin

log = logging.getLogger(__name__)

bp = Blueprint("auth", __name__)

OPEN_ENDPOINTS = ("auth.login", "static")
# the API takes a bearer token instead of a session (web/api.py checks it)
API_PREFIX = "/api/"
# compared against when the name is unknown, so both failures take as long
UNKNOWN_ADMIN_HASH = generate_password_hash("no administrator has this password")
# pages load scripts only from static files: no inline script runs, even
# one that slipped into a page through a value shown on it
CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    )
)


class SessionCookies(SecureCookieSessionInterface):
    """Session cookies marked Secure whenever the request came over HTTPS."""

    def get_cookie_secure(self, app):
        """Secure by the setting, or because this request is HTTPS."""
        return super().get_cookie_secure(app) or (
            has_request_context() and request.is_secure
        )


@bp.after_app_request
def security_headers(response):
    """No framing by other sites; scripts, styles and images from this site only."""
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    return response


def note_source():
    """Record this request's client address for the audit log."""
    g.source_token = service.acting_from.set(request.remote_addr)


def forget_source(exc):
    """Leave this thread's audit source as it found it."""
    token = g.pop("source_token", None)
    if token is not None:
        service.acting_from.reset(token)


def require_login():
    """Send anyone not logged in to the login page, remembering where they went."""
    if request.endpoint in OPEN_ENDPOINTS or request.path.startswith(API_PREFIX):
        return None
    username = session.get("admin")
    admin = Admin.get_or_none(Admin.username == username) if username else None
    ended = admins.sessions_ended_at(username) if admin else 0.0
    if admin is not None and session.get("since", 0) <= ended:
        admin = None
    if admin is None:
        wanted = request.full_path.rstrip("?") if request.method == "GET" else None
        return redirect(url_for("auth.login", next=wanted))
    g.admin = admin
    return None


@bp.route("/login", methods=("GET", "POST"))
def login():
    """Ask for a name and password; on success go where the admin was headed."""
    wanted = request.values.get("next", "")
    if request.method == "GET":
        return render_template("login.html", wanted=wanted, error=None)

    username = request.form.get("username", "").strip()
    password = request.form.get("password", "")
    settings = current_app.extensions["settings"]
    source = admins.login_source(request.remote_addr, settings.ipv6_prefix)
    lockout = settings.login_lockout_minutes

    wait = admins.login_wait(source, settings.login_failures, lockout)
    if wait:
        log.warning(
            "%r console login from %s refused: too many failures", username, source
        )
        error = (
            f"Too many failed logins from {source}: "
            f"try again in {math.ceil(wait / 60)} min."
        )
        page = render_template("login.html", wanted=wanted, error=error)
        return page, 429
    admin = Admin.get_or_none(Admin.username == username) if username else None
    stored_hash = admin.password_hash if admin else UNKNOWN_ADMIN_HASH
    if not check_password_hash(stored_hash, password) or admin is None:
        admins.record_login_failure(
            source, lockout, username=username, failures=settings.login_failures
        )
        log.warning("%r console login refused from %s", username, request.remote_addr)
        error = "Wrong administrator name or password."
        page = render_template("login.html", wanted=wanted, error=error)
        return page, 401

    admins.forget_login_failures(source)
    start_session(admin.username)
    service.audit(f"admin:{admin.username}", "login", admin.username)
    log.info("%s logged in to the console from %s", admin.username, request.remote_addr)
    return redirect(local_path(wanted))


def start_session(username, not_before=0.0):
    """A fresh session cookie for `username`, newer than `not_before`."""
    session.clear()
    session.permanent = True
    session["admin"] = username
    # a cookie as old as the last end of sessions is void: stay past it
    session["since"] = max(time.time(), not_before + 0.001)


@bp.post("/logout")
def logout():
    """End this session and every older one of this administrator."""
    if "admin" in session:
        admins.end_sessions(session["admin"])
        service.audit(f"admin:{session['admin']}", "logout", session["admin"])
    session.clear()
    flash("Logged out.", "ok")
    return redirect(url_for("auth.login"))


def local_path(target):
    """`target` when it is a path on this site, else the Suspicious IP log."""
    fallback = url_for("suspicious.index")
    if not target or not target.startswith("/") or target.startswith("//"):
        return fallback
    if "\\" in target or any(ord(char) < 32 for char in target):
        return fallback
    parts = urlsplit(target)
    if parts.scheme or parts.netloc:
        return fallback
    return target
