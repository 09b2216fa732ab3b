"""The lock-out guard: what no rule, console click or command may block."""

import html
import json
import sys
import time

import pytest
from netns import Lab

from appliance import addresses
from appliance import api_tokens
from appliance import cli
from appliance import service
from appliance.models import Block
from appliance.models import SuspiciousEntry
from tests.conftest import require_root_tools
from tests.conftest import write_config
from web import create_app


@pytest.fixture
def appliance_host(tmp_path):
    """A namespace holding 192.0.2.1 and 2001:db8::1, with an initialised appliance."""
    require_root_tools("ip")
    config_path = write_config(tmp_path)
    assert cli.main(["init", "--config", str(config_path)]) == 0
    with Lab() as lab:
        yield lab.add_host("mx", "192.0.2.1", "2001:db8::1"), config_path


def block_inside(host, config_path, target):
    """`sender-filter block TARGET` run inside the appliance's namespace."""
    return host.run(
        sys.executable,
        "-m",
        "appliance.cli",
        "block",
        target,
        "--config",
        str(config_path),
        check=False,
    )


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        ("192.0.2.1", "192.0.2.1 covers the appliance's own address 192.0.2.1"),
        ("192.0.2.0/24", "192.0.2.0/24 covers the appliance's own address 192.0.2.1"),
        (
            "2001:db8::/64",
            "2001:db8::/64 covers the appliance's own address 2001:db8::1",
        ),
    ],
)
def test_own_addresses_found_on_the_interfaces_are_never_blocked(
    appliance_host, target, reason
):
    host, config_path = appliance_host

    result = block_inside(host, config_path, target)

    assert result.returncode == 2
    assert result.stderr.strip() == f"sender-filter block: {reason}"


def test_a_neighbour_on_the_same_link_can_be_blocked(appliance_host):
    host, config_path = appliance_host

    result = block_inside(host, config_path, "192.0.2.77")

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("192.0.2.77 blocked 1h")


# every entry point against every protected case, in-process with a settings file

OWN = "192.0.2.1"
APPROVED = "198.51.100.50"
GUARD_SETTINGS = f"""
[network]
own_addresses = ["{OWN}", "2001:db8::1"]
[rules.spam]
window = 300
messages = 3
"""
WIDEST = "the widest range a block may cover"
REFUSALS = {
    OWN: f"{OWN} covers the appliance's own address {OWN}",
    "2001:db8::/64": "2001:db8::/64 covers the appliance's own address 2001:db8::1",
    "127.0.0.1": "127.0.0.1 covers loopback, which is always approved",
    "::1": "::1 covers loopback, which is always approved",
    APPROVED: f"{APPROVED} covers approved {APPROVED}",
    "198.51.100.0/24": f"198.51.100.0/24 covers approved {APPROVED}",
    "198.50.0.0/15": "198.50.0.0/15 is wider than /16, " + WIDEST,
    "2001:db8::/31": "2001:db8::/31 is wider than /32, " + WIDEST,
}


@pytest.fixture
def guarded(make_settings):
    """Settings naming own addresses, with one approved address; no blocks."""
    settings = make_settings(GUARD_SETTINGS)
    service.approve(APPROVED, actor="cli")
    return settings


@pytest.mark.parametrize(("target", "reason"), sorted(REFUSALS.items()))
def test_command_line_refuses_with_the_reason(guarded, capsys, target, reason):
    status = cli.main(["block", target, "--config", str(guarded.path)])

    assert status == 2
    assert capsys.readouterr().err.strip() == f"sender-filter block: {reason}"
    assert Block.select().count() == 0


@pytest.mark.parametrize(("target", "reason"), sorted(REFUSALS.items()))
def test_api_refuses_with_the_reason(guarded, target, reason):
    token = api_tokens.create_token("guard-test")
    client = create_app(guarded, {"TESTING": True}).test_client()

    response = client.post(
        "/api/v1/blocks",
        json={"target": target, "permanent": True},
        headers={"Authorization": f"Bearer {token}"},
    )

    assert response.status_code == 422
    assert response.get_json()["error"] == reason
    assert Block.select().count() == 0


@pytest.mark.parametrize("sender", [OWN, APPROVED, "127.0.0.1"])
def test_console_refuses_ticked_rows_with_the_reason(guarded, sender):
    service.add_admin("alice", "correct horse battery")
    app = create_app(guarded, {"TESTING": True, "WTF_CSRF_ENABLED": False})
    client = app.test_client()
    client.post(
        "/login", data={"username": "alice", "password": "correct horse battery"}
    )
    now = time.time()
    entry = SuspiciousEntry.create(
        sender=sender,
        sender_key=addresses.key_of(addresses.parse_ip(sender)),
        threat_type="spam",
        first_seen=now - 60,
        last_seen=now,
        violations=3,
        messages=5,
        rate=60.0,
    )

    page = client.post(
        "/suspicious/block",
        data={"entry": str(entry.id), "action": "permanent", "back": ""},
        follow_redirects=True,
    )

    assert page.status_code == 200
    assert f"{sender} not blocked: {REFUSALS[sender]}." in html.unescape(page.text)
    assert Block.select().count() == 0


def test_rule_never_blocks_own_or_approved_senders(guarded, tmp_path):
    events = tmp_path / "scanner.jsonl"
    now = time.time()
    with open(events, "w") as file:
        for sender in (OWN, APPROVED, "198.51.100.7"):
            for second in range(5):
                event = {"time": now - 60 + second, "ip": sender, "message": True}
                file.write(json.dumps({**event, "verdicts": ["spam"]}) + "\n")

    status = cli.main(["ingest", str(events), "--config", str(guarded.path)])

    assert status == 0
    assert [b.target for b in Block.select()] == ["198.51.100.7"]
    statuses = {e.sender: e.status for e in SuspiciousEntry.select()}
    assert statuses == {
        OWN: "approved",
        APPROVED: "approved",
        "198.51.100.7": "blocked",
    }
