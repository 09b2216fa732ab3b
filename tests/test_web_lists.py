"""The Blocked and Approved lists: manual records (IP, CIDR, domain name), the
actions on a block, kernel status, and names re-resolved on a schedule.

Domain names are served by a real dnsmasq on loopback (tests/dnsserver.py).
"""

import html
import re
import time
from datetime import timedelta

import pytest
from apscheduler.schedulers.background import BackgroundScheduler
from dnsserver import Dnsmasq
from test_web import csrf_token
from test_web import make_app
from test_web import page_text
from web_session import logged_in

from appliance import lists
from appliance import service
from appliance.models import ApprovedHost
from appliance.models import AuditEntry
from appliance.models import Block
from appliance.models import db
from appliance.resolve import NameResolver
from appliance.scheduler import BlockExpiry
from appliance.scheduler import schedule_reresolve

HOUR = 3600
NAME = "sender.example.test"
RECORDS = {
    NAME: ["192.0.2.77", "2001:db8::77"],
    "other.example.test": ["198.51.100.5"],
}


@pytest.fixture
def dns_server():
    """A dnsmasq on loopback serving RECORDS."""
    with Dnsmasq({}, RECORDS, authoritative_for="example.test") as server:
        yield server


@pytest.fixture
def client(make_settings, dns_server):
    """A logged-in client (CSRF checks off) whose resolver is the test dnsmasq."""
    settings = make_settings(f'[dns]\nnameservers = ["{dns_server.nameserver}"]\n')
    return logged_in(make_app(settings, WTF_CSRF_ENABLED=False))


def flashes(response, category):
    """The flash messages of one category on a page."""
    pattern = rf'<li class="flash-{category}">([^<]*)</li>'
    return re.findall(pattern, page_text(response))


def row(response, block):
    """One block's row of the Blocked list, as HTML."""
    return page_text(response).split(f'id="block-{block.id}"')[1].split("</tr>")[0]


def active(target):
    """The active block on exactly `target`, or None."""
    return Block.get_or_none((Block.target == target) & Block.lifted_at.is_null())


def add_block(client, record, **form):
    """Post the Blocked list's manual record form."""
    data = {"record": record, "action": "temporary", "duration": "1h", **form}
    return client.post("/blocks/add", data=data, follow_redirects=True)


# manual records


def test_manual_block_of_an_ip_for_a_duration_is_audited(client):
    response = add_block(client, "203.0.113.9", duration="2h", reason="probing")

    block = active("203.0.113.9")
    assert block.expires_at - block.created_at == 2 * HOUR
    assert (block.threat_type, block.created_by, block.reason) == (
        "manual",
        "admin:alice",
        "probing",
    )
    assert flashes(response, "ok") == ["203.0.113.9 blocked for 2h."]
    audit = AuditEntry.get(AuditEntry.action == "block")
    assert (audit.actor, audit.target, audit.source) == (
        "admin:alice",
        "203.0.113.9",
        "127.0.0.1",
    )


def test_manual_block_of_a_cidr_permanently(client):
    response = add_block(client, "198.51.100.0/24", action="permanent", duration="")

    block = active("198.51.100.0/24")
    assert (block.action, block.expires_at) == ("permanent", None)
    assert flashes(response, "ok") == ["198.51.100.0/24 blocked permanently."]


@pytest.mark.parametrize(
    ("form", "message"),
    [
        ({"record": ""}, "Give an IP, a CIDR network or a domain name."),
        ({"record": "999.1.1.1"}, "&#39;999.1.1.1&#39; is not an IP address"),
        ({"record": "10.0.0.0/8"}, "10.0.0.0/8 is wider than /16"),
        ({"record": "192.0.2.9/24"}, "has host bits set; did you mean 192.0.2.0/24?"),
        ({"record": "127.0.0.2"}, "127.0.0.2 covers loopback"),
        (
            {"record": "no such thing!"},
            "&#39;no such thing!&#39; is not an IP address, a CIDR network or a "
            "domain name",
        ),
        ({"record": "gone.example.test"}, "gone.example.test does not exist in DNS"),
        ({"duration": "soon"}, "&#39;soon&#39; is not a duration"),
        ({"duration": "31d"}, "a duration is 1 second to 30 days"),
        # digits are ASCII only, not Arabic-Indic or full-width ones
        ({"duration": "\u0663\u0660m"}, "&#39;\u0663\u0660m&#39; is not a duration"),
        ({"action": "forever"}, "Not a valid choice"),
    ],
)
def test_bad_manual_record_gets_a_message_on_the_form(client, form, message):
    data = {"record": "203.0.113.9", "action": "temporary", "duration": "1h", **form}

    response = client.post("/blocks/add", data=data)

    assert response.status_code == 200
    errors = re.findall(
        r'<p class="error" id="error-\w+">([^<]*)</p>', page_text(response)
    )
    assert len(errors) == 1 and message in errors[0]
    assert Block.select().count() == 0


def test_a_message_ending_in_a_question_gets_no_full_stop_after_it(client):
    data = {"record": "192.0.2.9/24", "action": "temporary", "duration": "1h"}

    on_the_form = client.post("/blocks/add", data=data)
    on_approval = client.post("/approved/add", data={"record": "192.0.2.9/24"})

    expected = (
        "&#39;192.0.2.9/24&#39; has host bits set; did you mean 192.0.2.0/24?</p>"
    )
    assert f"Not blocked: {expected}" in page_text(on_the_form)
    assert f"Not approved: {expected}" in page_text(on_approval)


def test_manual_block_of_a_domain_blocks_each_address(client):
    response = add_block(client, "Sender.Example.Test.", duration="30m")

    blocks = list(Block.select().order_by(Block.id))
    assert [(b.target, b.domain) for b in blocks] == [
        ("192.0.2.77", NAME),
        ("2001:db8::77", NAME),
    ]
    assert all(b.expires_at - b.created_at == 1800 for b in blocks)
    assert flashes(response, "ok") == ["192.0.2.77, 2001:db8::77 blocked for 30m."]
    listing = page_text(client.get("/blocks"))
    assert listing.count(f'<td class="domain">{NAME}</td>') == 2


def test_domain_address_that_is_approved_is_refused_alone(client):
    service.approve("192.0.2.77", actor="test")

    response = add_block(client, NAME, action="permanent")

    assert [b.target for b in Block.select()] == ["2001:db8::77"]
    assert flashes(response, "ok") == ["2001:db8::77 blocked permanently."]
    assert flashes(response, "refused") == [
        "192.0.2.77 not blocked: 192.0.2.77 covers approved 192.0.2.77."
    ]


def test_csrf_token_is_required_on_the_manual_record_form(make_settings):
    client = logged_in(make_app(make_settings()))
    form = {"record": "203.0.113.9", "action": "permanent"}

    refused = client.post("/blocks/add", data=form)
    token = csrf_token(client.get("/blocks"))
    accepted = client.post("/blocks/add", data={**form, "csrf_token": token})

    assert refused.status_code == 400
    assert accepted.status_code == 302
    assert active("203.0.113.9") is not None


# actions on a block


def test_extend_pushes_the_end_by_the_chosen_duration(client):
    block = service.block("203.0.113.9", duration=HOUR, actor="test")

    response = client.post(
        f"/blocks/{block.id}/extend", data={"duration": "2h"}, follow_redirects=True
    )

    extended = Block.get_by_id(block.id)
    assert extended.expires_at == block.expires_at + 2 * HOUR
    assert flashes(response, "ok")[0].startswith(
        "203.0.113.9 blocked 2h longer, until "
    )
    audit = AuditEntry.get(AuditEntry.action == "extend")
    assert (audit.actor, audit.detail) == ("admin:alice", f"block #{block.id} by 2h")


@pytest.mark.parametrize(
    ("duration", "message"),
    [
        ("", "Not extended: &#39;&#39; is not a duration"),
        ("30d", "Not extended: 203.0.113.9 would stay blocked more than 30 days"),
        ("0s", "Not extended: a duration is 1 second to 30 days."),
        ("\uff13\uff10m", "Not extended: &#39;\uff13\uff10m&#39; is not a duration"),
    ],
)
def test_bad_extension_says_why(client, duration, message):
    block = service.block("203.0.113.9", duration=HOUR, actor="test")

    response = client.post(
        f"/blocks/{block.id}/extend",
        data={"duration": duration},
        follow_redirects=True,
    )

    assert flashes(response, "refused")[0].startswith(message)
    assert Block.get_by_id(block.id).expires_at == block.expires_at


def test_make_permanent_then_extend_is_refused(client):
    block = service.block("203.0.113.9", duration=HOUR, actor="test")

    made = client.post(f"/blocks/{block.id}/permanent", follow_redirects=True)
    extended = client.post(
        f"/blocks/{block.id}/extend", data={"duration": "1h"}, follow_redirects=True
    )

    permanent = Block.get_by_id(block.id)
    assert (permanent.action, permanent.expires_at) == ("permanent", None)
    assert flashes(made, "ok") == ["203.0.113.9 blocked permanently now."]
    assert flashes(extended, "refused") == [
        "Not extended: 203.0.113.9 is blocked permanently already."
    ]


def test_move_to_approved_lifts_the_block(client):
    block = service.block("198.51.100.0/24", duration=None, actor="test")

    response = client.post(f"/blocks/{block.id}/approve", follow_redirects=True)

    lifted = Block.get_by_id(block.id)
    assert lifted.lift_reason == "approved"
    assert [a.target for a in ApprovedHost.select()] == ["198.51.100.0/24"]
    assert flashes(response, "ok") == [
        "198.51.100.0/24 moved to the approved list (block lifted)."
    ]


def test_actions_on_a_domain_row_act_on_every_address_of_it(client):
    add_block(client, NAME, duration="1h")
    first = Block.get(Block.target == "192.0.2.77")

    client.post(f"/blocks/{first.id}/extend", data={"duration": "1h"})
    extended = [b.expires_at - b.created_at for b in Block.select()]
    client.post(f"/blocks/{first.id}/approve")

    assert extended == [2 * HOUR, 2 * HOUR]
    assert [b.lift_reason for b in Block.select()] == ["approved", "approved"]
    assert [(a.target, a.domain) for a in ApprovedHost.select()] == [
        ("192.0.2.77", NAME),
        ("2001:db8::77", NAME),
    ]


def test_extending_a_name_leaves_its_permanent_rows_permanent(client):
    add_block(client, NAME, duration="1h")
    v4, v6 = Block.select().order_by(Block.id)
    Block.update(expires_at=None, action="permanent").where(Block.id == v6.id).execute()

    client.post(f"/blocks/{v6.id}/extend", data={"duration": "1h"})

    assert Block.get_by_id(v4.id).expires_at == v4.expires_at + HOUR
    assert Block.get_by_id(v6.id).expires_at is None


def test_unblock_one_row(client):
    block = service.block("203.0.113.9", duration=HOUR, actor="test")

    response = client.post(f"/blocks/{block.id}/unblock", follow_redirects=True)
    again = client.post(f"/blocks/{block.id}/unblock", follow_redirects=True)

    assert Block.get_by_id(block.id).lift_reason == "unblocked"
    assert flashes(response, "ok") == ["Unblocked 203.0.113.9."]
    assert flashes(again, "refused") == [
        f"Not unblocked: block #{block.id} is no longer in force."
    ]


# one past SQLite's largest row id: binding it would overflow
HUGE_ID = 2**63
GONE = "block #{id} is no longer in force."
UNKNOWN_ROW = {
    "/blocks/<int:block_id>/extend": "Not extended: " + GONE,
    "/blocks/<int:block_id>/permanent": "Not changed: " + GONE,
    "/blocks/<int:block_id>/approve": "Not approved: " + GONE,
    "/blocks/<int:block_id>/unblock": "Not unblocked: " + GONE,
    "/approved/<int:entry_id>/remove": (
        "Not removed: that approved entry is no longer on the list."
    ),
}


@pytest.mark.parametrize("row_id", [HUGE_ID, 10**30])
def test_row_id_past_sqlite_range_is_answered_as_an_unknown_row(client, row_id):
    rules = [
        rule for rule in client.application.url_map.iter_rules() if "<int:" in rule.rule
    ]
    answers = {}
    for rule in rules:
        url = re.sub(r"<int:\w+>", str(row_id), rule.rule)
        if "POST" in rule.methods:
            response = client.post(url, data={"duration": "1h"}, follow_redirects=True)
            answers[rule.rule] = (response.status_code, flashes(response, "refused"))
        else:
            response = client.get(url)
            answers[rule.rule] = (response.status_code, [])

    expected = {
        path: (200, [message.format(id=row_id)])
        for path, message in UNKNOWN_ROW.items()
    }
    # the evidence page of an entry that is not there
    expected["/suspicious/<int:entry_id>"] = (404, [])
    assert answers == expected


def test_kernel_status_shows_what_the_last_check_found(client):
    unknown = service.block("203.0.113.1", duration=HOUR, actor="test")
    held = service.block("203.0.113.2", duration=HOUR, actor="test")
    missing = service.block("203.0.113.3", duration=None, actor="test")
    Block.update(enforced=True, enforced_checked_at=time.time()).where(
        Block.id == held.id
    ).execute()
    Block.update(enforced=False, enforced_checked_at=time.time()).where(
        Block.id == missing.id
    ).execute()

    response = client.get("/blocks")

    assert '<td class="kernel-unknown">not checked yet</td>' in row(response, unknown)
    assert '<td class="kernel-yes" title="checked ' in row(response, held)
    assert ">in kernel</td>" in row(response, held)
    assert ">NOT in kernel</td>" in row(response, missing)
    assert "Extend" not in row(response, missing)
    assert "Make permanent" in row(response, held)


def test_kernel_status_under_dry_run_never_says_in_kernel(client):
    checked = service.block("203.0.113.1", duration=HOUR, actor="test")
    unchecked = service.block("203.0.113.2", duration=HOUR, actor="test")
    # as a daemon on the kernel backend left it before a switch to dry-run
    Block.update(enforced=True, enforced_checked_at=time.time()).where(
        Block.id == checked.id
    ).execute()
    service.publish_state(enforcement="dry-run", heartbeat=time.time())

    response = client.get("/blocks")

    for block in (checked, unchecked):
        assert re.search(
            r'<td class="kernel-no kernel-dry-run"[^>]*>not enforced \(dry-run\)</td>',
            row(response, block),
        )
    assert "in kernel" not in page_text(response)
    assert "with the dry-run backend no block is enforced" in page_text(response)


def test_blocked_list_shows_a_hundred_blocks_a_page(client):
    for n in range(101):
        service.block(f"198.51.100.{n}", duration=HOUR, actor="test")

    first = client.get("/blocks")
    second = client.get("/blocks?page=2")

    shown = re.findall(r'<td class="ip">([^<]*)</td>', page_text(second))
    assert page_text(first).count('<td class="ip">') == 100
    assert "101 active blocks, page 1 of 2." in page_text(first)
    assert shown == ["198.51.100.100"]
    assert 'href="/blocks?page=1" rel="prev"' in page_text(second)


@pytest.mark.parametrize("page", ["abc", "0", "-1", "\u0662", "1" * 12])
def test_a_wrong_page_number_says_so_and_shows_the_first_page(client, page):
    service.block("198.51.100.1", duration=HOUR, actor="test")

    response = client.get("/blocks", query_string={"page": page})

    errors = re.findall(
        r'<p class="error" id="error-page">([^<]*)</p>', page_text(response)
    )
    assert response.status_code == 200
    assert [html.unescape(error) for error in errors] == [
        f"Page {page[:20]!r}: the page is a whole number from 1."
    ]
    assert "1 active block." in page_text(response)
    assert "198.51.100.1</td>" in page_text(response)


# the approved list


def test_approve_ip_lifts_its_block_and_remove_takes_it_off(client):
    service.block("203.0.113.9", duration=HOUR, actor="test")

    added = client.post(
        "/approved/add",
        data={"record": "203.0.113.9", "note": "our partner"},
        follow_redirects=True,
    )
    entry = ApprovedHost.get()
    removed = client.post(f"/approved/{entry.id}/remove", follow_redirects=True)

    assert flashes(added, "ok") == [
        "203.0.113.9 approved (block on 203.0.113.9 lifted)."
    ]
    assert (entry.note, entry.created_by) == ("our partner", "admin:alice")
    assert active("203.0.113.9") is None
    assert flashes(removed, "ok") == ["203.0.113.9 no longer approved."]
    assert ApprovedHost.select().count() == 0
    trail = AuditEntry.select().where(AuditEntry.target == "203.0.113.9")
    actions = [(a.action, a.actor) for a in trail.order_by(AuditEntry.id)]
    assert actions == [
        ("block", "test"),
        ("approve", "admin:alice"),
        ("approved", "admin:alice"),
        ("unapprove", "admin:alice"),
    ]


def test_approve_domain_approves_each_address_and_lifts_blocks(client):
    service.block("2001:db8::/64", duration=None, actor="test")

    response = client.post(
        "/approved/add", data={"record": NAME}, follow_redirects=True
    )

    assert [(a.target, a.domain) for a in ApprovedHost.select()] == [
        ("192.0.2.77", NAME),
        ("2001:db8::77", NAME),
    ]
    assert active("2001:db8::/64") is None
    assert flashes(response, "ok") == [
        "192.0.2.77 approved.",
        "2001:db8::77 approved (block on 2001:db8::/64 lifted).",
    ]
    listing = client.get("/approved")
    first = ApprovedHost.get(ApprovedHost.target == "192.0.2.77")
    client.post(f"/approved/{first.id}/remove")
    assert listing.status_code == 200 and NAME in page_text(listing)
    assert ApprovedHost.select().count() == 0


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ("10.0.0.0/8", "10.0.0.0/8 is wider than /16, the widest range to approve"),
        ("gone.example.test", "gone.example.test does not exist in DNS"),
        ("bad_name", "is not an IP address, a CIDR network or a domain name"),
    ],
)
def test_bad_approved_record_gets_a_message_on_the_form(client, record, message):
    response = client.post("/approved/add", data={"record": record})

    assert response.status_code == 200
    assert message in page_text(response)
    assert ApprovedHost.select().count() == 0


def test_approving_twice_says_so(client):
    client.post("/approved/add", data={"record": "192.0.2.8"})

    response = client.post("/approved/add", data={"record": "192.0.2.8"})

    assert "Not approved: 192.0.2.8 is already approved." in page_text(response)


# names re-resolved on a schedule


def test_reresolve_follows_dns_changes_on_both_lists(client, dns_server):
    add_block(client, NAME, duration="1h")
    client.post("/approved/add", data={"record": "other.example.test"})
    first_end = active("192.0.2.77").expires_at
    changed = {
        NAME: ["192.0.2.78", "2001:db8::77"],
        "other.example.test": ["198.51.100.6"],
    }

    with Dnsmasq({}, changed, authoritative_for="example.test") as moved:
        count = lists.reresolve(NameResolver([moved.nameserver]))

    assert count == 4
    assert active("192.0.2.77") is None
    assert Block.get(Block.target == "192.0.2.77").lift_reason == "not in DNS"
    added = active("192.0.2.78")
    assert (added.domain, added.created_by) == (NAME, "scheduler")
    assert abs(added.expires_at - first_end) < 2
    assert active("2001:db8::77") is not None
    assert [(a.target, a.domain) for a in ApprovedHost.select()] == [
        ("198.51.100.6", "other.example.test")
    ]


def test_name_that_stops_resolving_keeps_its_rows(client, dns_server):
    add_block(client, NAME, action="permanent")

    with Dnsmasq({}, {}, authoritative_for="example.test") as empty:
        count = lists.reresolve(NameResolver([empty.nameserver]))

    assert count == 0
    assert {b.target for b in Block.select() if b.lifted_at is None} == {
        "192.0.2.77",
        "2001:db8::77",
    }


def test_daemon_job_reresolves_every_configured_minutes(make_settings, dns_server):
    # dnsmasq's host records hold one IPv4 and one IPv6 address each
    changed = {NAME: ["192.0.2.79", "2001:db8::77"]}
    woken = []

    with Dnsmasq({}, changed, authoritative_for="example.test") as moved:
        settings = make_settings(
            f'[dns]\nnameservers = ["{moved.nameserver}"]\nreresolve_minutes = 7\n'
        )
        first = NameResolver([dns_server.nameserver])
        lists.block_record(NAME, duration=None, actor="test", names=first)
        scheduler = BackgroundScheduler()
        schedule_reresolve(scheduler, settings, on_change=woken.append)
        job = scheduler.get_job("reresolve-names")
        job.func()

    assert job.trigger.interval == timedelta(minutes=7)
    assert woken == [2]
    assert Block.get(Block.target == "192.0.2.77").lift_reason == "not in DNS"
    added = active("192.0.2.79")
    assert (added.domain, added.action, added.created_by) == (
        NAME,
        "permanent",
        "scheduler",
    )


def test_expiry_job_of_an_extended_block_does_not_lift_it(settings):
    block = service.block("203.0.113.9", duration=HOUR, actor="test")
    expiry = BlockExpiry(on_lift=lambda targets: None)
    expiry.start()
    try:
        lists.extend(block.id, HOUR, actor="test")

        expiry._lift(block.id)
        db.connect(reuse_if_open=True)
        expiry.refresh()
        job = expiry.scheduler.get_job(f"block-{block.id}")
    finally:
        expiry.stop()

    assert active("203.0.113.9") is not None
    assert job.trigger.run_date.timestamp() == pytest.approx(block.expires_at + HOUR)
