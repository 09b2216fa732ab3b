"""The browser console: the app factory and what every page shares."""

import logging
import os
import secrets
from datetime import UTC
from datetime import datetime
from datetime import timedelta

from flask import Flask
from flask import g
from flask import render_template
from flask import request
from flask_wtf.csrf import CSRFError
from flask_wtf.csrf import CSRFProtect
from werkzeug.middleware.proxy_fix import ProxyFix

from appliance import kernelstatus
from appliance.models import db
from appliance.timefmt import format_duration
from web import activity
from web import admins
from web import api
from web import approved
from web import auth
from web import blocks
from web import overview
from web import rules
from web import sources
from web import suspicious
from web.dns import PtrLookup

log = logging.getLogger(__name__)

csrf = CSRFProtect()


def create_app(settings, test_config=None):
    """Build the console for `settings`; the caller has connected the database."""
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY=read_secret_key(settings.secret_key_file),
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        # Secure always with [web] https = true, else whenever served over HTTPS
        SESSION_COOKIE_SECURE=settings.https,
        PERMANENT_SESSION_LIFETIME=timedelta(minutes=settings.session_minutes),
        WTF_CSRF_TIME_LIMIT=settings.session_minutes * 60,
    )
    if test_config:
        app.config.update(test_config)

    app.extensions["settings"] = settings
    app.session_interface = auth.SessionCookies()
    if settings.proxies:
        app.wsgi_app = ProxyFix(
            app.wsgi_app, x_for=settings.proxies, x_proto=settings.proxies
        )
    app.extensions["ptr_lookup"] = PtrLookup(settings.nameservers, settings.dns_timeout)
    # the login guard runs before the CSRF check, so strangers go to the login page
    app.before_request(open_database)
    app.before_request(auth.note_source)
    app.before_request(auth.require_login)
    app.teardown_request(auth.forget_source)
    app.teardown_request(close_database)
    csrf.init_app(app)
    app.register_blueprint(auth.bp)
    app.register_blueprint(suspicious.bp)
    app.register_blueprint(blocks.bp)
    app.register_blueprint(approved.bp)
    app.register_blueprint(overview.bp)
    app.register_blueprint(sources.bp)
    app.register_blueprint(rules.bp)
    app.register_blueprint(admins.bp)
    app.register_blueprint(activity.bp)
    app.register_blueprint(api.bp)
    csrf.exempt(api.bp)
    app.register_error_handler(CSRFError, form_expired)
    app.jinja_env.trim_blocks = True
    app.jinja_env.lstrip_blocks = True
    app.add_template_filter(utc_time, "utc")
    app.add_template_filter(format_duration, "duration")
    app.context_processor(enforcement_notice)
    return app


def enforcement_notice():
    """A banner when blocks are not enforced: dry-run backend, no daemon, an error."""
    if request.path.startswith(("/api/", "/static/")):
        return {}
    text = kernelstatus.notice()
    return {"notice": text} if text else {}


def read_secret_key(path):
    """The session signing key from its file, created (mode 600) when missing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(descriptor, "w") as key_file:
            key_file.write(secrets.token_hex(32) + "\n")
        log.info("%s created with a new console secret key", path)
    key = path.read_text().strip()
    if len(key) < 32:
        raise RuntimeError(f"{path} holds a secret key shorter than 32 characters")
    return key


def open_database():
    """Give this request's thread its database connection."""
    g.opened_database = db.connect(reuse_if_open=True)


def close_database(exc):
    """Close the connection this request opened, leaving the caller's alone."""
    if g.pop("opened_database", False) and not db.is_closed():
        db.close()


def form_expired(error):
    """A POST without a valid CSRF token: say so plainly."""
    log.warning("form refused: %s", error.description)
    return render_template("form_expired.html", reason=error.description), 400


def utc_time(ts):
    """An epoch time as `YYYY-MM-DD HH:MM:SS` UTC; '' for None."""
    if ts is None:
        return ""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")
