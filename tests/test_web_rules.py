"""The Rules page: SPEC §2 settings per type, validated, audited, restorable,
and applied by a running daemon without a restart."""

import os
import subprocess
import sys
import time
from datetime import UTC
from datetime import datetime
from pathlib import Path

import pytest
from test_end_to_end import wait_until
from test_web import csrf_token
from test_web import make_app
from test_web import page_text
from web_session import logged_in

from appliance.daemon import RULES_EVERY
from appliance.models import AuditEntry
from appliance.models import Block
from appliance.models import Rule
from appliance.models import SuspiciousEntry

ROOT = Path(__file__).resolve().parents[1]
SPAM_FORM = {
    "spam-enabled": "y",
    "spam-window": "30m",
    "spam-rate": "50",
    "spam-messages": "3",
    "spam-action": "temporary",
    "spam-duration": "2h",
}


@pytest.fixture
def client(settings):
    """A logged-in client of the console, CSRF checks off."""
    return logged_in(make_app(settings, WTF_CSRF_ENABLED=False))


def stored(threat_type):
    """A rule's settings as the database holds them."""
    rule = Rule.get_by_id(threat_type)
    return rule.__data__ | {}


def test_rules_page_shows_each_rule_with_its_settings(client):
    Rule.update(window=7200, rate=12.5).where(Rule.threat_type == "virus").execute()

    text = page_text(client.get("/rules"))

    for threat_type in ("spam", "virus", "dha", "bounce"):
        assert f"<h2>{threat_type}</h2>" in text
        assert f"Save {threat_type} rule" in text
        assert f"Restore {threat_type} defaults" in text
    assert 'id="virus-window" name="virus-window" type="text" value="2h"' in text
    assert 'name="virus-rate" type="text" value="12.5"' in text
    assert 'name="spam-window" type="text" value="1h"' in text
    # recipients settings belong to the dha rule alone
    assert 'name="dha-unknown_recipients" type="text" value="5"' in text
    assert 'name="spam-recipients"' not in text
    assert '<label for="dha-window">Window</label>' in text


def test_saving_a_rule_stores_it_and_audits_the_change(client):
    response = client.post(
        "/rules/spam", data=SPAM_FORM, environ_base={"REMOTE_ADDR": "198.51.100.7"}
    )

    assert response.status_code == 302
    rule = Rule.get_by_id("spam")
    assert (rule.enabled, rule.window, rule.rate, rule.messages) == (True, 1800, 50, 3)
    assert (rule.action, rule.duration) == ("temporary", 7200)
    entry = AuditEntry.get(AuditEntry.action == "rule change")
    assert (entry.actor, entry.target, entry.source) == (
        "admin:alice",
        "spam",
        "198.51.100.7",
    )
    assert entry.detail == (
        "window 1h → 30m, rate 20% → 50%, messages 100 → 3, duration 1h → 2h"
    )
    assert "The spam rule is saved: window 1h → 30m" in page_text(
        client.get(response.location)
    )


def test_unticking_enabled_disables_the_rule(client):
    form = {**SPAM_FORM, "spam-window": "1h", "spam-rate": "20", "spam-messages": "100"}
    del form["spam-enabled"]

    client.post("/rules/spam", data={**form, "spam-duration": "1h"})

    assert Rule.get_by_id("spam").enabled is False
    assert (
        AuditEntry.get(AuditEntry.action == "rule change").detail == "enabled on → off"
    )


def test_saving_the_dha_rule_keeps_its_recipient_settings(client):
    form = {k.replace("spam-", "dha-"): v for k, v in SPAM_FORM.items()}
    form |= {"dha-recipients": "25", "dha-unknown_recipients": "7"}

    client.post("/rules/dha", data=form)

    rule = Rule.get_by_id("dha")
    assert (rule.recipients, rule.unknown_recipients, rule.messages) == (25, 7, 3)
    # the other rules' hidden recipient settings are left alone
    client.post("/rules/spam", data=SPAM_FORM)
    assert (Rule.get_by_id("spam").recipients, Rule.get_by_id("spam").rate) == (10, 50)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("spam-window", "30s", "Write a duration from 1m to 30d"),
        ("spam-window", "31d", "Write a duration from 1m to 30d"),
        ("spam-window", "soon", "Write a duration from 1m to 30d"),
        ("spam-window", "\u0663\u0660m", "Write a duration from 1m to 30d"),
        ("spam-rate", "120", "Write a number from 0 to 100, such as 20."),
        ("spam-rate", "-1", "Write a number from 0 to 100, such as 20."),
        ("spam-rate", "lots", "Write a number from 0 to 100, such as 20."),
        ("spam-rate", "nan", "Write a number from 0 to 100, such as 20."),
        ("spam-rate", "1_0", "Write a number from 0 to 100, such as 20."),
        ("spam-rate", "\u0663\u0660", "Write a number from 0 to 100, such as 20."),
        ("spam-rate", "\uff13\uff10%", "Write a number from 0 to 100, such as 20."),
        ("spam-messages", "\u0663\u0660", "Write a whole number, 0 or more."),
        ("spam-messages", "-5", "Write a whole number, 0 or more."),
        ("spam-messages", "1e3", "Write a whole number, 0 or more."),
        ("spam-messages", "", "Write a whole number, 0 or more."),
        ("spam-duration", "0s", "Write a duration from 1s to 30d"),
        ("spam-duration", "31d", "Write a duration from 1s to 30d"),
        ("spam-duration", "\uff13\uff10m", "Write a duration from 1s to 30d"),
        ("spam-action", "explode", "Not a valid choice."),
    ],
)
def test_wrong_rule_input_gets_a_message_on_the_form(client, field, value, message):
    before = stored("spam")

    response = client.post("/rules/spam", data={**SPAM_FORM, field: value})

    text = page_text(response)
    assert response.status_code == 200
    assert "The spam rule is not saved: correct the fields marked below." in text
    assert message in text
    assert f'aria-invalid="true" id="{field}"' in text
    assert stored("spam") == before
    assert AuditEntry.select().where(AuditEntry.action == "rule change").count() == 0


def test_wrong_dha_recipients_get_a_message(client):
    form = {k.replace("spam-", "dha-"): v for k, v in SPAM_FORM.items()}

    response = client.post("/rules/dha", data={**form, "dha-recipients": "ten"})

    assert "Write a whole number, 0 or more." in page_text(response)
    assert Rule.get_by_id("dha").recipients == 10


def test_unknown_threat_type_is_refused_with_a_message(client):
    response = client.post("/rules/phishing", data=SPAM_FORM, follow_redirects=True)

    assert "&#39;phishing&#39; is not a threat type." in page_text(response)


def test_restore_defaults_puts_back_the_config_seed_values(make_settings):
    settings = make_settings("[rules.spam]\nrate = 30\nwindow = 7200\n")
    client = logged_in(make_app(settings, WTF_CSRF_ENABLED=False))
    client.post("/rules/spam", data=SPAM_FORM)
    assert Rule.get_by_id("spam").rate == 50

    response = client.post("/rules/spam/defaults", follow_redirects=True)

    rule = Rule.get_by_id("spam")
    assert (rule.window, rule.rate, rule.messages, rule.duration) == (
        7200,
        30,
        100,
        3600,
    )
    assert "The spam rule is back to its defaults: window 30m → 2h" in page_text(
        response
    )
    actions = [e.action for e in AuditEntry.select().order_by(AuditEntry.id)]
    assert actions[-2:] == ["rule change", "rule change"]
    again = client.post("/rules/spam/defaults", follow_redirects=True)
    assert "already has its default settings" in page_text(again)
    assert "Defaults: enabled, window 2h," in page_text(again)


def test_rule_forms_without_csrf_token_are_refused(settings):
    client = logged_in(make_app(settings))
    token = csrf_token(client.get("/rules"))

    refused = client.post("/rules/spam", data=SPAM_FORM)
    refused_restore = client.post("/rules/spam/defaults")
    accepted = client.post("/rules/spam", data={**SPAM_FORM, "spam-csrf_token": token})

    assert (refused.status_code, refused_restore.status_code) == (400, 400)
    assert accepted.status_code == 302
    assert Rule.get_by_id("spam").messages == 3


def spam_lines(ip, count, first_id):
    """`count` milter rejects of spam from `ip`, each its own transaction, now."""
    stamp = datetime.now(UTC).isoformat(timespec="microseconds")
    return "".join(
        f"{stamp} mx1 postfix/smtpd[{27000 + n}]: {first_id + n:010X}: milter-reject: "
        f"DATA from unknown[{ip}]: 550 5.7.1 Spam message rejected; "
        f"from=<win@example.com> to=<bob@example.org> proto=ESMTP helo=<x.example>\n"
        for n in range(count)
    )


def test_rule_change_applies_in_the_running_daemon(make_settings, tmp_path):
    settings = make_settings('[logs]\nfiles = ["mail.log"]\n')
    mail_log = tmp_path / "mail.log"
    mail_log.write_text("")
    client = logged_in(make_app(settings, WTF_CSRF_ENABLED=False))
    daemon_log = open(tmp_path / "daemon.log", "w")
    daemon = subprocess.Popen(
        [sys.executable, "-m", "appliance.cli", "run", "--config", str(settings.path)],
        cwd=ROOT,
        stdout=daemon_log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert wait_until(
            lambda: "following" in (tmp_path / "daemon.log").read_text(), 20
        ), (tmp_path / "daemon.log").read_text()

        # under the seeded rule (more than 100 messages) six spams block nothing
        with mail_log.open("a") as log_file:
            log_file.write(spam_lines("192.0.2.10", 6, 0xA000))
        assert wait_until(
            lambda: SuspiciousEntry.get_or_none(
                (SuspiciousEntry.sender == "192.0.2.10")
                & (SuspiciousEntry.messages == 6)
            ),
            10,
        )
        assert Block.select().count() == 0

        # the console lowers the threshold; the daemon re-reads rules on its own
        saved = client.post("/rules/spam", data=SPAM_FORM)
        assert saved.status_code == 302
        time.sleep(RULES_EVERY + 1.5)
        with mail_log.open("a") as log_file:
            log_file.write(spam_lines("192.0.2.20", 4, 0xB000))

        block = wait_until(lambda: Block.get_or_none(Block.target == "192.0.2.20"), 10)
        assert block is not None, (tmp_path / "daemon.log").read_text()
        assert (block.created_by, block.threat_type, block.action) == (
            "rule:spam",
            "spam",
            "temporary",
        )
        assert block.reason == "spam rate 100% over 4 messages"
        assert block.expires_at - block.created_at == 7200
        assert daemon.poll() is None
        assert Block.get_or_none(Block.target == "192.0.2.10") is None
    finally:
        daemon.terminate()
        daemon.wait(10)
        daemon_log.close()
