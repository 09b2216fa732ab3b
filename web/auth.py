"""Administrator login and logout, and the guard that keeps every page behind it."""

import logging
import time
from urllib.parse import urlsplit

from flask import Blueprint
from flask import flash
from flask import g
from flask import redirect
from flask import render_template
from flask import request
from flask import session
from flask import url_for
from werkzeug.security import check_password_hash
from werkzeug.security import generate_password_hash

from appliance import service
from appliance.models import Admin
from appliance.models import ApplianceState

log = logging.getLogger(__name__)

bp = Blueprint("auth", __name__)

OPEN_ENDPOINTS = ("auth.login", "static")
# the API takes a bearer token instead of a session (web/api.py checks it)
API_PREFIX = "/api/"
# compared against when the name is unknown, so both failures take as long
UNKNOWN_ADMIN_HASH = generate_password_hash("no administrator has this password")


def require_login():
    """Send anyone not logged in to the login page, remembering where they went."""
    if request.endpoint in OPEN_ENDPOINTS or request.path.startswith(API_PREFIX):
        return None
    username = session.get("admin")
    admin = Admin.get_or_none(Admin.username == username) if username else None
    if admin is not None and session.get("since", 0) <= logged_out_at(username):
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

    admin = Admin.get_or_none(Admin.username == username) if username else None
    stored_hash = admin.password_hash if admin else UNKNOWN_ADMIN_HASH
    if not check_password_hash(stored_hash, password) or admin is None:
        log.warning("%r console login refused from %s", username, request.remote_addr)
        error = "Wrong administrator name or password."
        page = render_template("login.html", wanted=wanted, error=error)
        return page, 401

    session.clear()
    session.permanent = True
    session["admin"] = admin.username
    session["since"] = time.time()
    log.info("%s logged in to the console from %s", admin.username, request.remote_addr)
    return redirect(local_path(wanted))


@bp.post("/logout")
def logout():
    """End this session and every older one of this administrator."""
    if "admin" in session:
        service.publish_state(**{f"logout:{session['admin']}": time.time()})
    session.clear()
    flash("Logged out.", "ok")
    return redirect(url_for("auth.login"))


def logged_out_at(username):
    """When the administrator last logged out (cookies older than that are void)."""
    row = ApplianceState.get_or_none(ApplianceState.key == f"logout:{username}")
    return float(row.value) if row else 0.0


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
