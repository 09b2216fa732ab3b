"""The Administrators page: add, remove, change passwords; never the last admin;
a removed administrator's or a changed password's sessions end."""

import pytest
from test_web import PASSWORD
from test_web import csrf_token
from test_web import make_app
from test_web import page_text
from web_session import logged_in

from appliance import service
from appliance.models import Admin
from appliance.models import AuditEntry

BOB_PASSWORD = "bob's long password"


@pytest.fixture
def app(settings):
    """The console with alice, CSRF checks off."""
    return make_app(settings, WTF_CSRF_ENABLED=False)


@pytest.fixture
def client(app):
    """alice's session."""
    return logged_in(app, address="198.51.100.7")


def add_bob(client):
    """alice adds bob through the page."""
    return client.post(
        "/admins/add",
        data={
            "add-username": "bob",
            "add-password": BOB_PASSWORD,
            "add-confirm": BOB_PASSWORD,
        },
    )


def test_page_lists_administrators_with_remove_buttons(client):
    service.add_admin("carol", "carol's long password")

    text = page_text(client.get("/admins"))

    assert "<th>Name</th><th>Added</th><th>Remove</th>" in text
    assert "<td>alice (you)</td>" in text and "<td>carol</td>" in text
    assert "Remove carol</button>" in text
    assert '<label for="add-username">Name</label>' in text
    assert '<label for="password-password">New password</label>' in text


def test_adding_an_administrator_who_can_then_log_in(app, client):
    response = add_bob(client)

    assert response.status_code == 302
    assert "Administrator bob added." in page_text(client.get("/admins"))
    bob = Admin.get(Admin.username == "bob")
    assert bob.password_hash != BOB_PASSWORD
    assert bob.password_hash.startswith(("scrypt:", "pbkdf2:"))
    entry = AuditEntry.get(AuditEntry.action == "admin add", AuditEntry.target == "bob")
    assert (entry.actor, entry.source) == ("admin:alice", "198.51.100.7")
    assert logged_in(app, "bob", BOB_PASSWORD).get("/admins").status_code == 200


@pytest.mark.parametrize(
    "form, message",
    [
        ({"add-username": ""}, "Give the new administrator a name."),
        ({"add-username": "bob smith"}, "A name is letters, digits and underscores"),
        ({"add-username": "9lives"}, "A name is letters, digits and underscores"),
        ({"add-username": "alice"}, "Administrator alice already exists."),
        # names are unique whatever their case
        ({"add-username": "ALICE"}, "Administrator alice already exists."),
        ({"add-username": "Alice"}, "Administrator alice already exists."),
        (
            {"add-password": " " * 12, "add-confirm": " " * 12},
            "A password of only spaces is no password.",
        ),
        ({"add-password": "short", "add-confirm": "short"}, "at least 10 characters"),
        ({"add-confirm": "something else"}, "The two passwords differ."),
    ],
)
def test_wrong_new_administrator_gets_a_message_on_the_form(client, form, message):
    data = {
        "add-username": "bob",
        "add-password": BOB_PASSWORD,
        "add-confirm": BOB_PASSWORD,
        **form,
    }

    response = client.post("/admins/add", data=data)

    assert response.status_code == 200
    assert message in page_text(response).replace("&#39;", "'")
    assert Admin.select().count() == 1


def test_removing_an_administrator_ends_their_sessions(app, client):
    add_bob(client)
    bob = logged_in(app, "bob", BOB_PASSWORD)
    assert bob.get("/").status_code == 200

    response = client.post("/admins/remove", data={"remove-username": "bob"})

    assert response.status_code == 302
    assert Admin.get_or_none(Admin.username == "bob") is None
    assert bob.get("/").status_code == 302
    assert AuditEntry.get(AuditEntry.action == "admin remove").target == "bob"
    # a new bob does not inherit the old one's sessions
    service.add_admin("bob", BOB_PASSWORD)
    assert bob.get("/").status_code == 302


def test_the_last_administrator_cannot_be_removed(client):
    response = client.post("/admins/remove", data={"remove-username": "alice"})

    assert response.status_code == 200
    assert (
        "Not removed: alice is the last administrator; add another one first."
        in page_text(response)
    )
    assert Admin.select().count() == 1
    assert client.get("/admins").status_code == 200


def test_removing_an_unknown_administrator_says_so(client):
    response = client.post("/admins/remove", data={"remove-username": "mallory"})

    assert "Not removed: there is no administrator mallory." in page_text(response)


def test_removing_yourself_logs_you_out(client):
    service.add_admin("bob", BOB_PASSWORD)

    response = client.post("/admins/remove", data={"remove-username": "alice"})

    assert response.location == "/login"
    assert client.get("/").status_code == 302
    assert [a.username for a in Admin.select()] == ["bob"]


def password_form(username, new, current=""):
    """The change-password form's fields."""
    return {
        "password-username": username,
        "password-current": current,
        "password-password": new,
        "password-confirm": new,
    }


def test_changing_your_own_password_keeps_this_session_and_ends_others(app, client):
    elsewhere = logged_in(app, address="203.0.113.5")
    new = "a brand new passphrase"

    response = client.post(
        "/admins/password", data=password_form("alice", new, PASSWORD)
    )

    assert response.status_code == 302
    assert client.get("/admins").status_code == 200
    assert elsewhere.get("/").status_code == 302
    old_login = app.test_client().post(
        "/login", data={"username": "alice", "password": PASSWORD}
    )
    assert old_login.status_code == 401
    assert logged_in(app, "alice", new).get("/").status_code == 200
    entry = AuditEntry.get(AuditEntry.action == "admin password")
    assert (entry.actor, entry.target, entry.source) == (
        "admin:alice",
        "alice",
        "198.51.100.7",
    )


def test_your_own_password_needs_the_current_one(client):
    before = Admin.get(Admin.username == "alice").password_hash

    response = client.post(
        "/admins/password", data=password_form("alice", "a brand new one", "wrong")
    )

    assert "Your current password is not right." in page_text(response)
    assert Admin.get(Admin.username == "alice").password_hash == before


def test_changing_another_administrators_password_ends_their_sessions(app, client):
    add_bob(client)
    bob = logged_in(app, "bob", BOB_PASSWORD)

    client.post("/admins/password", data=password_form("bob", "bob's next password"))

    assert bob.get("/").status_code == 302
    assert logged_in(app, "bob", "bob's next password").get("/").status_code == 200
    assert client.get("/admins").status_code == 200


@pytest.mark.parametrize(
    "form, message",
    [
        (password_form("alice", "short", PASSWORD), "at least 10 characters"),
        (
            password_form("alice", "\t" + " " * 11, PASSWORD),
            "A password of only spaces is no password.",
        ),
        (
            {
                **password_form("alice", "long enough pass", PASSWORD),
                "password-confirm": "x",
            },
            "The two passwords differ.",
        ),
        (password_form("mallory", "long enough pass"), "Not a valid choice."),
    ],
)
def test_wrong_password_change_gets_a_message_on_the_form(client, form, message):
    before = Admin.get(Admin.username == "alice").password_hash

    response = client.post("/admins/password", data=form)

    assert response.status_code == 200
    assert message in page_text(response)
    assert Admin.get(Admin.username == "alice").password_hash == before


def test_admin_forms_without_csrf_token_are_refused(settings):
    client = logged_in(make_app(settings))
    data = {
        "add-username": "bob",
        "add-password": BOB_PASSWORD,
        "add-confirm": BOB_PASSWORD,
    }

    responses = [
        client.post("/admins/add", data=data),
        client.post("/admins/remove", data={"remove-username": "alice"}),
        client.post(
            "/admins/password", data=password_form("alice", "x" * 12, PASSWORD)
        ),
    ]

    assert [r.status_code for r in responses] == [400, 400, 400]
    assert [a.username for a in Admin.select()] == ["alice"]
    service.add_admin("bob", BOB_PASSWORD)
    token = csrf_token(client.get("/admins"))
    removed = client.post(
        "/admins/remove", data={"remove-username": "bob", "remove-csrf_token": token}
    )
    assert removed.status_code == 302
    assert [a.username for a in Admin.select()] == ["alice"]
