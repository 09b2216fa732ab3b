"""The Sender filtering log: each block's start, end and why, and every recorded
action with who, what, when and from where; searchable by IP/CIDR and dates."""

import html
import re
import sqlite3
from datetime import UTC
from datetime import datetime
from datetime import timedelta

import pytest
from test_web import HOUR
from test_web import NOON
from test_web import args_of
from test_web import links
from test_web import make_app
from test_web import page_text
from web_session import logged_in

from appliance import addresses
from appliance import cli
from appliance import models
from appliance import service
from appliance.models import AuditEntry
from appliance.models import Block
from appliance.models import Rule


@pytest.fixture
def client(settings):
    """alice's session, CSRF checks off."""
    return logged_in(make_app(settings, WTF_CSRF_ENABLED=False))


def block(target, at, duration=HOUR, actor="rule:spam", reason="spam rate 90%"):
    """A block made at epoch `at`, as the profiler or the console makes one."""
    return service.block_network(
        addresses.parse_network(target),
        threat_type="spam" if actor.startswith("rule") else "manual",
        duration=duration,
        actor=actor,
        reason=reason,
        now=at,
    )


def rows(response):
    """The table's rows, each a list of its cells' text."""
    body = page_text(response).split("<tbody>", 1)[-1].split("</tbody>", 1)[0]
    return [
        [html.unescape(cell) for cell in re.findall(r"<td[^>]*>([^<]*)</td>", row)]
        for row in re.findall(r"<tr>(.*?)</tr>", body, re.DOTALL)
    ]


def targets(response):
    """The target column, top to bottom."""
    return re.findall(r'<td class="ip">([^<]*)</td>', page_text(response))


def test_blocks_list_shows_each_start_end_and_why(client):
    block("192.0.2.10", NOON)
    service.expire_due(now=NOON + 2 * HOUR)
    block("198.51.100.0/24", NOON + 600, None, "admin:alice", "open relay")
    service.lift(
        Block.target == "198.51.100.0/24",
        actor="admin:bob",
        reason="unblocked",
        now=NOON + 1800,
    )
    block("2001:db8:1::/64", NOON + 900, 86400 * 30, "admin:alice", "harvest")
    block("203.0.113.7", NOON + 1200, None, "cli", "")

    response = client.get("/activity?view=blocks")

    assert "<th>Started</th><th>By</th><th>Why</th>" in page_text(response)
    assert rows(response) == [
        [
            "203.0.113.7",
            "manual",
            "2026-03-01 12:20:00",
            "cli",
            "",
            "in force (permanent)",
            "",
        ],
        [
            "2001:db8:1::/64",
            "manual",
            "2026-03-01 12:15:00",
            "admin:alice",
            "harvest",
            "2026-03-31 12:15:00",
            "expired",
        ],
        [
            "198.51.100.0/24",
            "manual",
            "2026-03-01 12:10:00",
            "admin:alice",
            "open relay",
            "2026-03-01 12:30:00",
            "unblocked",
        ],
        [
            "192.0.2.10",
            "spam",
            "2026-03-01 12:00:00",
            "rule:spam",
            "spam rate 90%",
            "2026-03-01 13:00:00",
            "expired",
        ],
    ]


def test_a_block_still_in_force_says_until_when(client):
    future = service.time.time() + HOUR
    block("192.0.2.10", future - 60)

    assert rows(client.get("/activity"))[0][5].startswith("in force until ")


def test_actions_list_shows_who_what_when_and_from_where(
    settings, client, monkeypatch, capsys
):
    config = ["--config", str(settings.path)]
    monkeypatch.delenv("SSH_CONNECTION", raising=False)
    assert cli.main([*config, "block", "192.0.2.10", "--reason", "by hand"]) == 0
    monkeypatch.setenv("SSH_CONNECTION", "198.51.100.9 52000 192.0.2.1 22")
    assert cli.main([*config, "approve", "192.0.2.10"]) == 0
    client.environ_base["REMOTE_ADDR"] = "203.0.113.50"
    Rule.update(rate=50).where(Rule.threat_type == "spam").execute()
    client.post("/rules/spam/defaults")
    block("192.0.2.99", service.time.time())

    response = client.get("/activity?view=actions")

    assert "<th>When</th><th>Who</th><th>From</th><th>What</th>" in page_text(response)
    shown = [row[1:] for row in rows(response)]
    user = cli.getpass.getuser()
    assert shown == [
        ["rule:spam", "—", "block", "192.0.2.99", "1h: spam rate 90%"],
        ["admin:alice", "203.0.113.50", "rule change", "spam", "rate 50% → 20%"],
        [
            "cli",
            f"198.51.100.9 (ssh, {user})",
            "approved",
            "192.0.2.10",
            "block #1 lifted",
        ],
        ["cli", f"198.51.100.9 (ssh, {user})", "approve", "192.0.2.10", ""],
        ["cli", f"local ({user})", "block", "192.0.2.10", "1h: by hand"],
        ["admin:alice", "127.0.0.1", "login", "alice", ""],
        ["cli", "—", "admin add", "alice", ""],
    ]
    capsys.readouterr()


SEARCHES = [
    ("192.0.2.10", ["192.0.2.10"]),
    ("192.0.2.70", ["192.0.2.64/26"]),
    ("192.0.2.0/24", ["192.0.2.64/26", "192.0.2.10"]),
    ("192.0.0.0/16", ["192.0.2.64/26", "192.0.2.10"]),
    ("198.51.100.5", ["198.51.100.5"]),
    ("2001:db8:1::5", ["2001:db8:1::/64"]),
    ("2001:db8::/32", ["2001:db8:1::/64"]),
    ("::ffff:198.51.100.5", ["198.51.100.5"]),
    ("203.0.113.1", []),
]


@pytest.mark.parametrize("search, expected", SEARCHES)
def test_search_by_ip_or_cidr_in_both_lists(client, search, expected):
    block("192.0.2.10", NOON)
    block("192.0.2.64/26", NOON + 60, None, "admin:alice", "hosting range")
    block("198.51.100.5", NOON + 120)
    block("2001:db8:1::/64", NOON + 180)

    found_blocks = targets(client.get("/activity", query_string={"ip": search}))
    found_actions = targets(
        client.get("/activity", query_string={"ip": search, "view": "actions"})
    )

    assert found_blocks == expected
    assert found_actions == expected


def test_date_range_shows_blocks_in_force_during_it(client):
    block("203.0.113.1", NOON - 24 * HOUR)
    block("203.0.113.2", NOON)
    block("203.0.113.3", NOON + 3 * HOUR, None)

    def shown(since="", until=""):
        return targets(
            client.get("/activity", query_string={"from": since, "to": until})
        )

    assert shown("2026-03-01T12:30", "2026-03-01T14:00") == ["203.0.113.2"]
    assert shown("2026-03-01T14:00") == ["203.0.113.3"]
    assert shown(until="2026-02-28") == ["203.0.113.1"]
    assert shown("2026-03-01") == ["203.0.113.3", "203.0.113.2"]
    # the to-minute is whole: a block made at 15:00:00 is inside "to 15:00"
    assert shown("2026-03-01T14:00", "2026-03-01T15:00") == ["203.0.113.3"]
    assert shown("2026-03-01T13:01", "2026-03-01T14:59") == []


def test_date_range_of_actions_is_when_they_were_taken(client):
    block("203.0.113.2", NOON)
    service.expire_due(now=NOON + 2 * HOUR)
    today = datetime.now(UTC).date()

    def shown(since="", until=""):
        dates = {"view": "actions", "from": since, "to": until, "ip": "203.0.113.2"}
        return [row[3] for row in rows(client.get("/activity", query_string=dates))]

    # the log records when an action was taken, not the event time it names
    assert shown(str(today), str(today)) == ["expired", "block"]
    assert shown(until=str(today - timedelta(days=1))) == []
    assert shown(since=str(today + timedelta(days=1))) == []


def test_paging_keeps_the_filters_and_stops_at_the_last_page(client):
    for n in range(60):
        block(f"203.0.113.{n + 1}", NOON + n)
    block("192.0.2.200", NOON)

    first = client.get("/activity?ip=203.0.113.0/24&per_page=25")
    last = client.get("/activity?ip=203.0.113.0/24&per_page=25&page=3")
    beyond = client.get("/activity?ip=203.0.113.0/24&per_page=25&page=99")

    assert "60 blocks found; page 1 of 3." in page_text(first)
    assert targets(first) == [f"203.0.113.{n}" for n in range(60, 35, -1)]
    assert targets(last) == [f"203.0.113.{n}" for n in range(10, 0, -1)]
    assert targets(beyond) == targets(last)
    next_link = next(
        link for link in links(first) if args_of(link).get("page") == ["2"]
    )
    assert args_of(next_link) == {
        "view": ["blocks"],
        "ip": ["203.0.113.0/24"],
        "per_page": ["25"],
        "page": ["2"],
    }
    assert targets(client.get(next_link)) == [
        f"203.0.113.{n}" for n in range(35, 10, -1)
    ]


@pytest.mark.parametrize(
    "query, message",
    [
        ("ip=not-an-address", "'not-an-address' is not an IP address"),
        ("ip=192.0.2.9/24", "did you mean 192.0.2.0/24?"),
        ("from=yesterday", "'yesterday' is not a date-time such as 2026-12-04T10:00"),
        ("from=2026-03-02&to=2026-03-01", "the 'to' date-time is before the 'from'"),
        ("per_page=7", "rows per page must be one of 25, 50, 100"),
        ("page=-1", "the page is a whole number from 1"),
        ("view=secrets", "the list is one of blocks, actions"),
    ],
)
def test_wrong_search_gets_a_message_on_the_form(client, query, message):
    block("192.0.2.1", NOON)

    response = client.get(f"/activity?{query}")

    assert response.status_code == 200
    assert message in html.unescape(page_text(response))
    assert targets(response) == []
    assert "Search</button>" in page_text(response)


def test_a_database_from_before_gets_the_new_columns(tmp_path):
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as old:
        old.execute(
            "CREATE TABLE auditentry (id INTEGER PRIMARY KEY, ts REAL NOT NULL, "
            "actor VARCHAR(255) NOT NULL, action VARCHAR(255) NOT NULL, "
            "target VARCHAR(255) NOT NULL, detail TEXT NOT NULL)"
        )
        old.execute(
            "INSERT INTO auditentry VALUES (1, 1.0, 'cli', 'block', '192.0.2.1', '1h')"
        )
    old.close()

    database = models.connect(path)

    columns = {column.name for column in database.get_columns("auditentry")}
    assert {"source", "key_first", "key_last"} <= columns
    entry = AuditEntry.get_by_id(1)
    assert (entry.target, entry.source, entry.key_first) == ("192.0.2.1", None, None)
    indexes = {index.name for index in database.get_indexes("auditentry")}
    assert "auditentry_key_first_key_last" in indexes
    database.close()
