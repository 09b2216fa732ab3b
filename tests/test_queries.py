"""The Suspicious IP log query: its plans agree with a plain sort; capped counts."""

import random
from datetime import UTC
from datetime import datetime

import pytest
from playhouse.shortcuts import model_to_dict
from test_web import PASSWORD
from test_web import add_entry
from test_web import make_app

from appliance import addresses
from appliance import models
from appliance import queries
from appliance import service
from appliance.models import SuspiciousEntry
from appliance.queries import SuspiciousQuery

NOON = datetime(2026, 3, 1, 12, 0, tzinfo=UTC).timestamp()
HOUR = 3600
STATUSES = ("suspicious", "monitored", "blocked", "approved")
FIELDS = {
    "time": "last_seen",
    "type": "threat_type",
    "ip": "sender_key",
    "violations": "violations",
    "messages": "messages",
    "rate": "rate",
    "status": "status",
}


@pytest.fixture
def entries(settings):
    """Two hundred seeded entries with many ties, as plain dicts."""
    rng = random.Random(7)
    rows = []
    for n in range(200):
        network = addresses.parse_network(f"198.51.100.{n % 60 + 1}")
        entry = SuspiciousEntry.create(
            sender=str(network.network_address),
            sender_key=addresses.key_of(network.network_address),
            threat_type=rng.choice(("spam", "virus", "dha", "bounce")),
            first_seen=NOON - rng.randrange(10) * HOUR - HOUR,
            last_seen=NOON - rng.randrange(10) * HOUR,
            violations=rng.randrange(1, 6),
            messages=rng.randrange(5, 9),
            rate=rng.choice((10.0, 20.0, 50.0)),
            status=rng.choice(STATUSES),
        )
        rows.append(model_to_dict(entry, recurse=False))
    return rows


def expected_ids(rows, args):
    """The page's entry ids worked out by brute force from the SPEC's rules."""
    query, errors = SuspiciousQuery.from_args(args)
    assert errors == {}
    keys = [(FIELDS[query.sort], query.order)]
    if query.then:
        keys.append((FIELDS[query.then], query.then_order))
    tie = keys[-1][1]
    if "last_seen" not in (field for field, _ in keys):
        keys.append(("last_seen", tie))
    keys.append(("id", tie))

    chosen = [
        row
        for row in rows
        if row["threat_type"] in query.types
        and (query.since_ts is None or row["last_seen"] >= query.since_ts)
        and (query.until_ts is None or row["first_seen"] < query.until_ts)
    ]
    if query.network is not None:
        first, last = addresses.key_range(query.network)
        chosen = [row for row in chosen if first <= row["sender_key"] <= last]
    # stable sorts from the last key to the first
    for field, order in reversed(keys):
        chosen.sort(key=lambda row, f=field: row[f], reverse=order == "desc")
    start = (query.page - 1) * query.per_page
    return [row["id"] for row in chosen[start : start + query.per_page]]


CASES = [
    {},
    {"sort": "violations", "order": "asc"},
    {"sort": "status", "page": "3", "per_page": "10"},
    {
        "sort": "type",
        "then": "rate",
        "then_order": "asc",
        "page": "4",
        "per_page": "10",
    },
    {"sort": "status", "then": "violations", "page": "2", "per_page": "25"},
    {"sort": "rate", "then": "type", "page": "2", "per_page": "10"},
    {"sort": "time", "order": "asc", "then": "messages", "per_page": "10"},
    {"type": ["virus", "dha"], "sort": "messages", "page": "2", "per_page": "10"},
    {"from": "2026-03-01T08:00", "sort": "ip", "order": "desc", "per_page": "10"},
    {"to": "2026-03-01T05:00", "sort": "rate", "per_page": "10"},
    {"ip": "198.51.100.0/27", "sort": "violations", "then": "status", "page": "2"},
    {"type": ["spam"], "sort": "type", "then": "time", "then_order": "asc"},
]


@pytest.mark.parametrize("cap", [10_000, 40])
@pytest.mark.parametrize("args", CASES)
def test_every_plan_pages_like_a_plain_sort(entries, monkeypatch, cap, args):
    monkeypatch.setattr(queries, "MATCH_CAP", cap)
    query, _ = SuspiciousQuery.from_args(args)

    page = query.run()

    assert [entry.id for entry in page.rows] == expected_ids(entries, args)


def test_count_is_exact_up_to_the_cap_and_says_more_past_it(entries, monkeypatch):
    monkeypatch.setattr(queries, "MATCH_CAP", 40)
    spam = sum(1 for row in entries if row["threat_type"] == "spam")
    assert spam > 40

    capped = SuspiciousQuery.from_args({"type": ["spam"], "page": "9"})[0].run()
    everything = SuspiciousQuery.from_args({"per_page": "10", "page": "9"})[0].run()

    assert (capped.total, capped.more, capped.pages, capped.page) == (40, True, 2, 2)
    assert capped.bounded
    assert (everything.total, everything.more, everything.pages) == (200, False, 4)
    assert everything.bounded and everything.page == 4


def test_page_says_when_matches_lie_past_the_last_page(client, monkeypatch):
    monkeypatch.setattr(queries, "MATCH_CAP", 3)
    for n in range(5):
        add_entry(f"192.0.2.{n + 10}")

    capped, whole, narrow = (
        " ".join(client.get(url).get_data(as_text=True).split())
        for url in ("/?type=spam", "/", "/?ip=192.0.2.10")
    )

    assert "3+ entries, page 1 of 1" in capped
    assert "Pages reach the first 3 entries in this order" in capped
    assert "5 entries, page 1 of 1" in whole
    assert 'id="paging-bound"' in whole
    assert "1 entry, page 1 of 1" in narrow
    assert 'id="paging-bound"' not in narrow


def test_second_sort_column_round_trips_and_is_checked():
    query, errors = SuspiciousQuery.from_args({"sort": "type", "then": "rate"})
    same, _ = SuspiciousQuery.from_args({"sort": "rate", "then": "rate"})
    _, wrong = SuspiciousQuery.from_args({"then": "colour", "then_order": "up"})

    assert errors == {}
    assert query.to_args()["then"] == "rate"
    assert query.to_args()["then_order"] == "desc"
    assert SuspiciousQuery.from_args(query.to_args())[0] == query
    assert "then" not in same.to_args()
    assert "is not a column to sort by" in wrong["then"]
    assert wrong["then_order"] == "the sort order is asc or desc"


def test_indexes_an_older_version_made_are_dropped(settings):
    models.db.execute_sql(
        'CREATE INDEX "suspiciousentry_rate" ON suspiciousentry (rate)'
    )

    models.connect(settings.database)

    names = {index.name for index in models.db.get_indexes("suspiciousentry")}
    assert "suspiciousentry_rate" not in names
    assert "suspiciousentry_violations_last_seen_id_first_seen_threa_eca98c9" in names


def test_blocks_are_found_for_more_senders_than_one_query_may_name(
    settings, monkeypatch
):
    # the review's case: 1,150 senders or more crashed the one OR'd query
    senders = [f"2001:db8:0:{n:x}::/64" for n in range(1300)]
    with models.db.atomic():
        logged = [add_entry(sender) for sender in senders]
    wide = service.block("2001:db8:0:100::/56", duration=None, actor="test")
    last = service.block(senders[-1], duration=3600, actor="test")
    service.block(senders[-2], duration=3600, actor="test")
    service.unblock(senders[-2], actor="test")
    statements = []
    execute = models.db.obj.execute_sql

    def counted(sql, *args, **kwargs):
        statements.append(sql)
        return execute(sql, *args, **kwargs)

    monkeypatch.setattr(models.db.obj, "execute_sql", counted)
    found = queries.active_blocks_for(logged)
    page = queries.active_blocks_for(logged[250:350])

    assert {entry_id: block.id for entry_id, block in found.items()} == {
        **{entry.id: wide.id for entry in logged[0x100:0x200]},
        logged[-1].id: last.id,
    }
    assert {entry_id: block.id for entry_id, block in page.items()} == {
        entry.id: wide.id for entry in logged[0x100:350]
    }
    # 1,300 senders in six queries of at most 250; a console page in one
    assert len(statements) == 6 + 1


def test_page_query_walks_the_sort_index(entries):
    query, _ = SuspiciousQuery.from_args({"type": ["spam"], "sort": "messages"})
    conditions = query._conditions(walk=query.sort)
    sql, params = queries._entries(conditions, query._ordering()).limit(25).sql()

    plan = models.db.execute_sql("EXPLAIN QUERY PLAN " + sql, params).fetchall()

    assert "INDEX suspiciousentry_messages_" in plan[0][-1]
    assert all("TEMP B-TREE" not in step[-1] for step in plan)


# the console


@pytest.fixture
def client(settings):
    """The console, logged in."""
    client = make_app(settings, WTF_CSRF_ENABLED=False).test_client()
    client.post("/login", data={"username": "alice", "password": PASSWORD})
    return client
