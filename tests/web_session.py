"""Logging a test client in to the console, with or without CSRF checks."""

from test_web import PASSWORD
from test_web import csrf_token


def logged_in(app, username="alice", password=PASSWORD, address="127.0.0.1"):
    """A test client with a session for `username`, coming from `address`."""
    client = app.test_client()
    client.environ_base["REMOTE_ADDR"] = address
    form = {"username": username, "password": password}
    if app.config.get("WTF_CSRF_ENABLED", True):
        form["csrf_token"] = csrf_token(client.get("/login"))
    assert client.post("/login", data=form).status_code == 302
    return client
