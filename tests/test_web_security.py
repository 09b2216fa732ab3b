"""Console security: no route open without login, a brake on password guessing
per source address (kept in the database), Secure session cookies over HTTPS."""

import re
from dataclasses import replace
from urllib.parse import urlsplit

import pytest
from test_web import PASSWORD
from test_web import make_app
from test_web import page_text
from web_session import logged_in

from appliance import config
from appliance.models import AuditEntry
from appliance.models import LoginFailure

OPEN = ("auth.login", "static")
GUESSER = "198.51.100.66"


@pytest.fixture
def app(settings):
    """The console with alice, CSRF checks off."""
    return make_app(settings, WTF_CSRF_ENABLED=False)


def concrete(rule):
    """A URL for a rule, each <variable> filled with a plausible value."""
    return re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", lambda m: "1", rule.rule)


def test_every_route_but_login_and_static_needs_a_session(app):
    client = app.test_client()
    checked = []

    for rule in app.url_map.iter_rules():
        if rule.endpoint in OPEN:
            continue
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            response = client.open(concrete(rule), method=method)
            checked.append((rule.rule, method))
            if rule.rule.startswith("/api/"):
                assert response.status_code == 401, (rule.rule, method)
                assert response.get_json()["error"], (rule.rule, method)
            else:
                assert response.status_code == 302, (rule.rule, method)
                assert urlsplit(response.location).path == "/login", (rule.rule, method)

    # the walk covered this part's pages and at least one API route
    for needed in ("/rules", "/admins", "/activity", "/rules/<threat_type>"):
        assert any(path == needed for path, _ in checked), needed
    assert any(path.startswith("/api/") for path, _ in checked)


def fail_login(app, address, username="alice"):
    """One wrong-password attempt from `address`."""
    client = app.test_client()
    return client.post(
        "/login",
        data={"username": username, "password": "guess"},
        environ_base={"REMOTE_ADDR": address},
    )


def right_login(app, address):
    """A right-password attempt from `address`."""
    return app.test_client().post(
        "/login",
        data={"username": "alice", "password": PASSWORD},
        environ_base={"REMOTE_ADDR": address},
    )


def test_five_failures_refuse_that_address_even_with_the_right_password(app):
    statuses = [fail_login(app, GUESSER, name).status_code for name in "abcde"]

    refused = right_login(app, GUESSER)

    assert statuses == [401] * 5
    assert refused.status_code == 429
    assert f"Too many failed logins from {GUESSER}: try again in 15 min." in page_text(
        refused
    )
    assert logged_in_as(app, refused) is None
    assert logged_in_as(app, right_login(app, "203.0.113.8")) == "alice"
    # another address is not held back
    assert right_login(app, "203.0.113.8").status_code == 302


def test_failed_logins_and_the_lock_out_are_in_the_sender_filtering_log(app):
    for name in ("alice", "mallory", "", "alice", "root", "alice"):
        fail_login(app, GUESSER, name)
    right_login(app, GUESSER)

    recorded = [
        (entry.actor, entry.action, entry.target, entry.detail, entry.source)
        for entry in AuditEntry.select().order_by(AuditEntry.id)
        if entry.action != "admin add"
    ]
    failed = [
        ("console", "login failed", GUESSER, f"as {name!r}", GUESSER)
        for name in ("alice", "mallory")
    ]
    assert recorded == [
        *failed,
        ("console", "login failed", GUESSER, "without a name", GUESSER),
        ("console", "login failed", GUESSER, "as 'alice'", GUESSER),
        ("console", "login failed", GUESSER, "as 'root'", GUESSER),
        (
            "console",
            "login lockout",
            GUESSER,
            "5 failed logins in 15 min: refused for 15 min",
            GUESSER,
        ),
    ]


def test_the_refusal_lasts_the_lock_out_then_lifts(app):
    for _ in range(5):
        fail_login(app, GUESSER)
    assert right_login(app, GUESSER).status_code == 429

    # the failures age past the 15-minute lock-out, as the clock would move them
    LoginFailure.update(ts=LoginFailure.ts - 15 * 60 - 1).execute()

    assert right_login(app, GUESSER).status_code == 302


def test_failures_are_kept_in_the_database_across_workers_and_restarts(settings):
    first_worker = make_app(settings, WTF_CSRF_ENABLED=False)
    for _ in range(3):
        fail_login(first_worker, GUESSER)
    second_worker = make_app(settings, WTF_CSRF_ENABLED=False)
    for _ in range(2):
        fail_login(second_worker, GUESSER)

    restarted = make_app(settings, WTF_CSRF_ENABLED=False)

    assert LoginFailure.select().where(LoginFailure.source == GUESSER).count() == 5
    assert right_login(restarted, GUESSER).status_code == 429


def test_a_successful_login_clears_its_address_failures(app):
    for _ in range(4):
        fail_login(app, GUESSER)

    assert right_login(app, GUESSER).status_code == 302
    assert fail_login(app, GUESSER).status_code == 401
    assert LoginFailure.select().where(LoginFailure.source == GUESSER).count() == 1


def test_ipv6_guesses_count_per_64(app):
    for host in range(1, 6):
        fail_login(app, f"2001:db8:7:7::{host}")

    refused = right_login(app, "2001:db8:7:7::99")

    assert refused.status_code == 429
    assert "Too many failed logins from 2001:db8:7:7::/64" in page_text(refused)
    assert right_login(app, "2001:db8:7:8::1").status_code == 302


def test_web_settings_are_read_and_checked(tmp_path):
    path = tmp_path / "config.toml"
    web = {
        "https": True,
        "proxies": 1,
        "login_failures": 2,
        "login_lockout_minutes": 60,
    }

    settings = config.from_mapping({"web": web}, path)

    assert (settings.https, settings.proxies) == (True, 1)
    assert (settings.login_failures, settings.login_lockout_minutes) == (2, 60)
    defaults = config.from_mapping({}, path)
    assert (defaults.https, defaults.proxies, defaults.login_failures) == (False, 0, 5)
    for key, value, message in [
        ("https", "yes", "https must be true or false"),
        ("proxies", 9, "proxies must be an integer from 0 to 5"),
        ("login_failures", 0, "login_failures must be an integer from 1 to 1000"),
    ]:
        with pytest.raises(config.ConfigError, match=message):
            config.from_mapping({"web": {key: value}}, path)


def test_lock_out_follows_the_settings(settings):
    settings = replace(settings, login_failures=2, login_lockout_minutes=60)
    app = make_app(settings, WTF_CSRF_ENABLED=False)
    fail_login(app, GUESSER)
    fail_login(app, GUESSER)

    refused = right_login(app, GUESSER)

    assert refused.status_code == 429
    assert "try again in 60 min." in page_text(refused)


def session_cookie(response):
    """The Set-Cookie header of the session cookie."""
    cookies = response.headers.getlist("Set-Cookie")
    return next(cookie for cookie in cookies if cookie.startswith("session="))


def logged_in_as(app, response):
    """The administrator the response's session cookie names, if any."""
    value = session_cookie(response).split(";")[0].removeprefix("session=")
    serializer = app.session_interface.get_signing_serializer(app)
    return serializer.loads(value).get("admin")


def test_session_cookie_is_secure_over_https_and_always_httponly(app):
    plain = right_login(app, "203.0.113.8")
    secure = app.test_client().post(
        "https://localhost/login",
        data={"username": "alice", "password": PASSWORD},
    )

    plain_cookie, secure_cookie = session_cookie(plain), session_cookie(secure)
    assert "Secure" not in plain_cookie
    assert "Secure" in secure_cookie
    for cookie in (plain_cookie, secure_cookie):
        assert "HttpOnly" in cookie and "SameSite=Lax" in cookie


def test_https_setting_makes_the_cookie_secure_behind_any_front_end(settings):
    settings = replace(settings, https=True)
    app = make_app(settings, WTF_CSRF_ENABLED=False)

    response = right_login(app, "203.0.113.8")

    assert "Secure" in session_cookie(response)


def test_behind_a_proxy_the_forwarded_client_is_the_source(settings):
    settings = replace(settings, proxies=1)
    app = make_app(settings, WTF_CSRF_ENABLED=False)
    forwarded = {"X-Forwarded-For": GUESSER, "X-Forwarded-Proto": "https"}
    for _ in range(5):
        app.test_client().post(
            "/login", data={"username": "alice", "password": "guess"}, headers=forwarded
        )

    refused = app.test_client().post(
        "/login", data={"username": "alice", "password": PASSWORD}, headers=forwarded
    )
    proxied = app.test_client().post(
        "/login",
        data={"username": "alice", "password": PASSWORD},
        headers={"X-Forwarded-For": "203.0.113.8", "X-Forwarded-Proto": "https"},
    )

    assert refused.status_code == 429
    assert proxied.status_code == 302
    assert "Secure" in session_cookie(proxied)


def test_logged_in_pages_of_this_part_open(app):
    client = logged_in(app)

    for path in ("/rules", "/admins", "/activity", "/activity?view=actions"):
        assert client.get(path).status_code == 200, path


@pytest.mark.parametrize(
    "path", ["/login", "/suspicious", "/overview", "/static/style.css"]
)
def test_pages_refuse_framing_and_run_only_their_own_scripts(app, path):
    response = logged_in(app).get(path)

    assert response.status_code == 200
    assert response.headers["X-Frame-Options"] == "DENY"
    policy = response.headers["Content-Security-Policy"].split("; ")
    assert "script-src 'self'" in policy
    assert "frame-ancestors 'none'" in policy
    # no page holds a script of its own or an event handler attribute
    body = response.get_data(as_text=True)
    assert not re.search(r"<script>|<script(?! (src|type=\"application/json\"))", body)
    assert not re.search(r"\son[a-z]+=", body)
