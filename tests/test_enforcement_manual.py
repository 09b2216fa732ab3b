"""Enforcement as an administrator meets it: the console, the CLI and the API.

A typed IPv6 address is blocked per /64; a covered address cannot be
unblocked on its own and says which block covers it; repeat offences and
their settings are shown; an enforcement error is a banner on every page.
"""

import html
import json
import re
import time

import pytest
from test_web import PASSWORD
from test_web import make_app

from appliance import api_tokens
from appliance import cli
from appliance import service
from appliance.models import ApplianceState
from appliance.models import Block


@pytest.fixture
def client(settings):
    """The console, logged in as alice, with CSRF checks off."""
    client = make_app(settings, WTF_CSRF_ENABLED=False).test_client()
    client.post("/login", data={"username": "alice", "password": PASSWORD})
    return client


@pytest.fixture
def run(settings, capsys):
    """Run `sender-filter ARGS --config ...`: (status, stdout, stderr)."""

    def run_command(*argv):
        status = cli.main([*argv, "--config", str(settings.path)])
        captured = capsys.readouterr()
        return status, captured.out, captured.err

    return run_command


def page(response):
    """A page's text with entities undone."""
    return html.unescape(response.get_data(as_text=True))


def test_cli_blocks_a_typed_ipv6_address_per_64_and_says_so(run):
    status, out, _ = run("block", "2001:db8:5:6::7", "--permanent")

    assert status == 0
    assert out.splitlines() == [
        "2001:db8:5:6::/64 blocked permanent",
        "(IPv6 senders are blocked per /64: 2001:db8:5:6::7 is in it)",
    ]
    assert [b.target for b in Block.select()] == ["2001:db8:5:6::/64"]


def test_explicit_ipv6_cidrs_are_blocked_as_given(run):
    assert run("block", "2001:db8:5:6::7/128", "--permanent")[0] == 0
    assert run("block", "2001:db8:7::/48", "--permanent")[0] == 0

    assert [b.target for b in Block.select()] == ["2001:db8:5:6::7", "2001:db8:7::/48"]


def test_ipv6_prefix_setting_sets_what_a_typed_address_covers(make_settings, capsys):
    settings = make_settings("[network]\nipv6_prefix = 56\n")

    status = cli.main(["block", "2001:db8:5:6::7", "--config", str(settings.path)])

    assert status == 0
    assert [b.target for b in Block.select()] == ["2001:db8:5::/56"]
    assert "blocked per /56" in capsys.readouterr().out


def test_console_blocks_a_typed_ipv6_address_per_64_and_says_so(client):
    response = client.post(
        "/blocks/add",
        data={"record": "2001:db8:5:6::7", "action": "permanent", "reason": ""},
        follow_redirects=True,
    )

    assert [b.target for b in Block.select()] == ["2001:db8:5:6::/64"]
    assert re.findall(r'<li class="flash-ok">([^<]*)</li>', page(response)) == [
        "2001:db8:5:6::/64 blocked permanently (IPv6 senders are blocked per "
        "network: 2001:db8:5:6::7 is in 2001:db8:5:6::/64)."
    ]


def test_api_blocks_a_bare_ipv6_address_per_64(settings):
    token = api_tokens.create_token("scanner")
    api = make_app(settings).test_client()

    answer = api.post(
        "/api/v1/blocks",
        json={"target": "2001:db8:5:6::7", "permanent": True},
        headers={"Authorization": f"Bearer {token}"},
    )

    assert answer.status_code == 201, answer.json
    assert answer.json["target"] == "2001:db8:5:6::/64"


def test_unblocking_a_covered_address_names_the_covering_block(run):
    assert run("block", "198.51.100.0/24", "--permanent")[0] == 0

    status, out, err = run("unblock", "198.51.100.21")

    assert (status, out) == (2, "")
    assert err == (
        "sender-filter unblock: 198.51.100.21 is covered by the block on "
        "198.51.100.0/24; unblock 198.51.100.0/24 to lift it\n"
    )
    assert Block.get().lifted_at is None


def test_blocks_json_shows_offences_and_the_repeat_settings(run):
    run("block", "192.0.2.7", "--for", "1h")
    run("unblock", "192.0.2.7")
    run("block", "192.0.2.7", "--for", "1h")

    status, out, _ = run("blocks", "--json")
    text = run("blocks")[1]

    listed = json.loads(out)
    assert status == 0
    assert [(b["target"], b["offence"]) for b in listed["blocks"]] == [("192.0.2.7", 2)]
    assert listed["repeat"] == {"period": 604800, "factor": 2.0, "maximum": 2592000}
    assert " offence 2 " in text
    assert text.splitlines()[-1] == (
        "repeat offenders: blocked again within 1w, x2 longer per offence, at most 30d"
    )


def test_blocked_list_shows_offences_and_the_repeat_settings(client):
    first = service.block("192.0.2.7", duration=3600, actor="cli")
    service.unblock("192.0.2.7", actor="cli")
    again = service.block("192.0.2.7", duration=3600, actor="cli")

    text = page(client.get("/blocks"))

    assert first.offence == 1
    row = text.split(f'id="block-{again.id}"')[1].split("</tr>")[0]
    assert '<td class="offence">2</td>' in row
    assert (
        "Repeat offenders: a rule's block of a target blocked before within 1w\n"
        "  lasts 2 times longer per earlier block, at most 30d." in text
    )


@pytest.mark.parametrize("path", ["/", "/blocks", "/approved", "/rules"])
def test_enforcement_error_is_a_banner_on_every_page(client, path):
    error = "2 blocks NOT enforced: the kernel sets are full"
    service.publish_state(
        enforcement="kernel", heartbeat=time.time(), enforcement_error=error
    )

    shown = page(client.get(path))
    service.publish_state(enforcement_error="")
    cleared = page(client.get(path))

    assert (
        '<p class="notice">ENFORCEMENT ERROR: 2 blocks NOT enforced: the kernel '
        "sets are full. Blocks shown as NOT in kernel are not enforced; see the "
        "daemon's log.</p>" in shown
    )
    assert 'class="notice"' not in cleared


def kernel_checked(block, enforced, at):
    """Record what a daemon's check found for one block, as the daemon writes it."""
    Block.update(enforced=enforced, enforced_checked_at=at).where(
        Block.id == block.id
    ).execute()


def test_cli_shows_each_blocks_kernel_status_and_the_error_as_the_console(run, client):
    now = time.time()
    unchecked = service.block("192.0.2.7", duration=3600, actor="cli")
    held = service.block("198.51.100.7", duration=None, actor="cli")
    missing = service.block("2001:db8:5:6::/64", duration=None, actor="cli")
    kernel_checked(held, True, 1_800_000_000.0)
    kernel_checked(missing, False, 1_800_000_000.0)
    error = "1 blocks NOT enforced: the kernel sets are full"
    service.publish_state(
        enforcement="kernel",
        heartbeat=now,
        kernel_checked_at=1_800_000_060.0,
        enforcement_error=error,
    )
    notice = (
        f"ENFORCEMENT ERROR: {error}. Blocks shown as NOT in kernel are not "
        "enforced; see the daemon's log."
    )

    listed = json.loads(run("blocks", "--json")[1])
    text = run("blocks")[1].splitlines()
    status = json.loads(run("status", "--json")[1])
    status_text = run("status")[1].splitlines()
    console = page(client.get("/blocks"))

    assert [
        (b["target"], b["kernel"], b["kernel_checked_at"]) for b in listed["blocks"]
    ] == [
        ("192.0.2.7", "not checked yet", ""),
        ("198.51.100.7", "in kernel", "2027-01-15T08:00:00+00:00"),
        ("2001:db8:5:6::/64", "NOT in kernel", "2027-01-15T08:00:00+00:00"),
    ]
    assert listed["enforcement"] == {
        "backend": "kernel",
        "kernel_checked_at": "2027-01-15T08:01:00+00:00",
        "error": error,
        "notice": notice,
    }
    assert text[:2] == [
        "enforcement: kernel, kernel last checked 2027-01-15T08:01:00+00:00",
        notice,
    ]
    listing = [(line.split()[0], line) for line in text[2:5]]
    assert [target for target, _line in listing] == [
        "192.0.2.7",
        "198.51.100.7",
        "2001:db8:5:6::/64",
    ]
    assert " not checked yet " in listing[0][1]
    assert " in kernel " in listing[1][1] and " NOT in kernel " in listing[2][1]
    assert status["kernel"] == {
        "in kernel": 1,
        "NOT in kernel": 1,
        "not checked yet": 1,
        "not enforced (dry-run)": 0,
    }
    assert status["enforcement"] == listed["enforcement"]
    assert status_text[-3:] == [
        "3 active blocks: 1 in kernel, 1 NOT in kernel, 1 not checked yet",
        "enforcement: kernel, kernel last checked 2027-01-15T08:01:00+00:00",
        notice,
    ]
    # the console words the same rows and the same error alike
    for block, words in ((unchecked, "not checked yet"), (held, "in kernel")):
        row = console.split(f'id="block-{block.id}"')[1].split("</tr>")[0]
        assert f">{words}</td>" in row
    assert f'<p class="notice">{notice}</p>' in console


def test_cli_says_no_block_is_enforced_under_dry_run(run):
    checked = service.block("192.0.2.7", duration=3600, actor="cli")
    service.block("198.51.100.7", duration=3600, actor="cli")
    service.unblock("198.51.100.7", actor="cli")
    # as a daemon on the kernel backend left it before a switch to dry-run
    kernel_checked(checked, True, time.time())
    service.publish_state(enforcement="dry-run", heartbeat=time.time())

    listed = json.loads(run("blocks", "--all", "--json")[1])
    status = run("status")[1].splitlines()

    assert [(b["target"], b["kernel"]) for b in listed["blocks"]] == [
        ("192.0.2.7", "not enforced (dry-run)"),
        ("198.51.100.7", None),
    ]
    assert listed["enforcement"]["notice"] == (
        "Enforcement is DRY-RUN: the daemon logs what it would block and blocks "
        "nothing."
    )
    assert status[-3] == "1 active blocks: 1 not enforced (dry-run)"


def test_cli_says_when_the_daemon_went_silent(run):
    service.publish_state(
        enforcement="kernel", heartbeat=time.time(), enforcement_error="stale"
    )
    ApplianceState.update(updated_at=time.time() - 60).where(
        ApplianceState.key == "heartbeat"
    ).execute()

    shown = json.loads(run("status", "--json")[1])["enforcement"]

    assert shown["error"] == "stale"
    assert shown["notice"].startswith("The daemon is not running: new blocks,")
