"""The browser console: login, the Suspicious IP log, blocking, the blocked list."""

import html
import re
import socket
import time
from datetime import UTC
from datetime import datetime
from datetime import timedelta
from urllib.parse import parse_qs
from urllib.parse import urlsplit

import pytest
from dnsserver import Dnsmasq

from appliance import addresses
from appliance import cli
from appliance import service
from appliance.models import ApplianceState
from appliance.models import Block
from appliance.models import Rule
from appliance.models import SuspiciousEntry
from appliance.queries import SuspiciousQuery
from appliance.timefmt import parse_time
from web import create_app

PASSWORD = "correct horse battery"
NOON = datetime(2026, 3, 1, 12, 0, tzinfo=UTC).timestamp()
HOUR = 3600


def add_entry(sender, threat_type="spam", last_seen=NOON, **values):
    """Put one episode in the Suspicious IP log as the profiler would."""
    network = addresses.parse_network(sender)
    values.setdefault("first_seen", last_seen - 600)
    values.setdefault("violations", 3)
    values.setdefault("messages", 10)
    values.setdefault("rate", round(values["violations"] * 100 / values["messages"], 2))
    return SuspiciousEntry.create(
        sender=sender,
        sender_key=addresses.key_of(network.network_address),
        threat_type=threat_type,
        last_seen=last_seen,
        **values,
    )


def make_app(settings, **config):
    """The console with an administrator `alice`."""
    if service.Admin.get_or_none(service.Admin.username == "alice") is None:
        service.add_admin("alice", PASSWORD)
    return create_app(settings, {"TESTING": True, **config})


@pytest.fixture
def app(settings):
    """The console with CSRF checks off, for tests that post forms directly."""
    return make_app(settings, WTF_CSRF_ENABLED=False)


@pytest.fixture
def client(app):
    """A test client logged in as alice."""
    client = app.test_client()
    response = client.post("/login", data={"username": "alice", "password": PASSWORD})
    assert response.status_code == 302
    return client


def page_text(response):
    """The response body as text."""
    return response.get_data(as_text=True)


def shown_ips(response):
    """The IP column of the table, top to bottom."""
    return re.findall(r'<td class="ip">([^<]*)</td>', page_text(response))


def links(response):
    """Every href on the page, unescaped."""
    return [
        html.unescape(h) for h in re.findall(r'href="([^"]*)"', page_text(response))
    ]


def args_of(url):
    """The query args of a URL as a dict of lists."""
    return parse_qs(urlsplit(url).query)


# login


def test_every_page_redirects_to_login_when_logged_out(app):
    client = app.test_client()
    for rule in app.url_map.iter_rules():
        # the token-authenticated API answers 401 JSON instead (test_events.py)
        if rule.endpoint in ("auth.login", "static") or rule.rule.startswith("/api/"):
            continue
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            response = client.open(rule.rule, method=method)
            assert response.status_code == 302, (rule.rule, method)
            assert urlsplit(response.location).path == "/login", (rule.rule, method)


def test_login_with_right_password_opens_the_log(app):
    client = app.test_client()

    response = client.post(
        "/login",
        data={"username": "alice", "password": PASSWORD, "next": "/blocks"},
    )

    assert response.status_code == 302
    assert response.location == "/blocks"
    cookie = response.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Expires=" in cookie
    assert client.get("/").status_code == 200


@pytest.mark.parametrize("username", ["alice", "mallory"])
def test_login_with_wrong_password_fails(app, username):
    client = app.test_client()

    response = client.post("/login", data={"username": username, "password": "nope"})

    assert response.status_code == 401
    assert "Wrong administrator name or password" in page_text(response)
    assert client.get("/").status_code == 302


@pytest.mark.parametrize(
    "wanted", ["//evil.example/", "https://evil.example/", "/\\evil.example", "blocks"]
)
def test_login_redirects_only_to_local_paths(app, wanted):
    client = app.test_client()

    response = client.post(
        "/login", data={"username": "alice", "password": PASSWORD, "next": wanted}
    )

    assert response.location == "/"


def test_logged_out_visitor_returns_to_the_page_asked_for(app):
    response = app.test_client().get("/suspicious?type=dha&per_page=10")

    assert args_of(response.location)["next"] == ["/suspicious?type=dha&per_page=10"]


def test_logout_ends_the_session(client):
    response = client.post("/logout")

    assert response.location == "/login"
    assert client.get("/").status_code == 302


def test_a_cookie_saved_before_logout_no_longer_works(client):
    saved = client.get_cookie("session").value
    assert client.get("/blocks").status_code == 200

    client.post("/logout")
    client.set_cookie("session", saved)

    assert client.get("/blocks").status_code == 302


def test_session_expires_after_its_lifetime(settings):
    lifetime = timedelta(seconds=1)
    client = make_app(
        settings, WTF_CSRF_ENABLED=False, PERMANENT_SESSION_LIFETIME=lifetime
    ).test_client()
    client.post("/login", data={"username": "alice", "password": PASSWORD})
    assert client.get("/").status_code == 200

    time.sleep(2.1)

    assert client.get("/").status_code == 302


def test_secret_key_file_is_created_private(settings, app):
    assert settings.secret_key_file.stat().st_mode & 0o777 == 0o600
    assert app.secret_key == settings.secret_key_file.read_text().strip()


# filters


def test_filter_by_type_shows_only_ticked_types(client):
    add_entry("192.0.2.1", "spam")
    add_entry("192.0.2.2", "virus")
    add_entry("192.0.2.3", "dha")

    response = client.get("/?type=virus&type=dha")

    assert response.status_code == 200
    assert sorted(shown_ips(response)) == ["192.0.2.2", "192.0.2.3"]
    assert re.search(r'value="virus"\s+checked', page_text(response))
    assert not re.search(r'value="spam"\s+checked', page_text(response))


@pytest.mark.parametrize(
    ("search", "expected"),
    [
        ("198.51.100.7", ["198.51.100.7"]),
        ("198.51.100.0/24", ["198.51.100.7", "198.51.100.200"]),
        ("2001:db8:1:2::9", ["2001:db8:1:2::/64"]),
        ("2001:db8:1::/48", ["2001:db8:1:2::/64", "2001:db8:1:3::/64"]),
        ("::ffff:198.51.100.7", ["198.51.100.7"]),
    ],
)
def test_filter_by_ip_address_or_network(client, search, expected):
    add_entry("198.51.100.7")
    add_entry("198.51.100.200")
    add_entry("203.0.113.5")
    add_entry("2001:db8:1:2::/64")
    add_entry("2001:db8:1:3::/64")
    add_entry("2001:db8:2:1::/64")

    response = client.get("/", query_string={"ip": search, "sort": "ip"})

    assert response.status_code == 200
    assert shown_ips(response) == expected


def test_filter_by_dates_shows_episodes_overlapping_the_range(client):
    add_entry("192.0.2.1", first_seen=NOON - 3 * HOUR, last_seen=NOON - 2 * HOUR)
    add_entry("192.0.2.2", first_seen=NOON - 90 * 60, last_seen=NOON + HOUR)
    add_entry("192.0.2.3", first_seen=NOON - 10 * HOUR, last_seen=NOON + 10 * HOUR)
    add_entry("192.0.2.4", first_seen=NOON + 2 * HOUR, last_seen=NOON + 3 * HOUR)

    response = client.get("/?from=2026-03-01T11:00&to=2026-03-01T12:30&sort=ip")

    assert shown_ips(response) == ["192.0.2.2", "192.0.2.3"]
    assert 'value="2026-03-01T11:00"' in page_text(response)


def test_to_date_covers_the_whole_minute_it_names():
    start, span = parse_time("2026-03-01T12:00")

    assert (start, span) == (NOON, 60)
    assert parse_time("2026-03-01") == (NOON - 12 * HOUR, 86400)


def test_query_args_round_trip():
    args = {"type": ["dha"], "ip": "192.0.2.0/24", "from": "2026-03-01T11:00"}
    query, errors = SuspiciousQuery.from_args({**args, "sort": "rate", "page": "3"})

    again, _ = SuspiciousQuery.from_args(query.to_args())

    assert errors == {}
    assert again.to_args() == query.to_args()
    assert query.to_args()["order"] == "desc" and query.to_args()["page"] == "3"


# sorting


SORTS = {
    "time": lambda e: (e.last_seen, e.id),
    "type": lambda e: (e.threat_type, e.last_seen, e.id),
    "ip": lambda e: (e.sender_key, e.last_seen, e.id),
    "violations": lambda e: (e.violations, e.last_seen, e.id),
    "messages": lambda e: (e.messages, e.last_seen, e.id),
    "rate": lambda e: (e.rate, e.last_seen, e.id),
    "status": lambda e: (e.status, e.last_seen, e.id),
}


@pytest.mark.parametrize("column", sorted(SORTS))
def test_sort_by_each_column_and_reverse(client, column):
    entries = [
        add_entry("192.0.2.10", "virus", NOON - 50, violations=5, messages=9),
        add_entry("10.0.0.1", "spam", NOON - 10, violations=9, messages=40),
        add_entry("2001:db8::/64", "dha", NOON - 30, violations=1, messages=50),
        add_entry("192.0.2.9", "bounce", NOON - 20, violations=7, messages=7),
    ]
    entries[1].status = "monitored"
    entries[1].save()

    ascending = client.get(f"/?sort={column}&order=asc")
    descending = client.get(f"/?sort={column}&order=desc")

    expected = [e.sender for e in sorted(entries, key=SORTS[column])]
    assert shown_ips(ascending) == expected
    assert shown_ips(descending) == expected[::-1]


def test_clicking_the_sorted_column_again_reverses_it(client):
    add_entry("192.0.2.1")

    response = client.get("/?sort=violations&type=spam")

    head = page_text(response).split("<thead>")[1].split("</thead>")[0]
    titles = dict(re.findall(r'<a href="([^"]*)">(\w+)', head))
    by_title = {title: args_of(html.unescape(href)) for href, title in titles.items()}
    assert by_title["Violations"]["order"] == ["asc"]
    assert by_title["Rate"]["order"] == ["desc"]
    assert by_title["IP"]["order"] == ["asc"]
    assert all(args["type"] == ["spam"] for args in by_title.values())


def test_then_by_control_sorts_ties_by_a_second_column_and_stays(client):
    # two senders per type; within a type violations fall as the time rises
    for n, threat_type in enumerate(("spam", "spam", "virus", "virus", "dha")):
        add_entry(f"198.51.100.{n}", threat_type, NOON + n * 60, violations=10 - n)

    shown = client.get(
        "/?sort=type&order=asc&then=violations&then_order=asc&per_page=10"
    )

    body = page_text(shown)
    control = body.split('class="per-page"')[1].split("</form>")[0]
    head = body.split("<thead>")[1].split("</thead>")[0]
    filters = body.split('class="filters"')[1].split("</form>")[0]
    # dha first; within spam and virus the fewest violations first
    assert shown_ips(shown) == [f"198.51.100.{n}" for n in (4, 1, 0, 3, 2)]
    assert "Sorted by Type ▲, then by" in control
    assert '<option value="violations" selected>Violations</option>' in control
    assert '<option value="asc" selected>ascending ▲</option>' in control
    # the first column is no choice for the second
    assert '<option value="type"' not in control
    assert "then ▲</span>" in head.split("Violations</a>")[1].split("</th>")[0]
    # Display Log and every column title keep the second column
    hidden = dict(re.findall(r'type="hidden" name="(\w+)" value="([^"]*)"', filters))
    assert (hidden["then"], hidden["then_order"]) == ("violations", "asc")
    rate = next(u for u in links(shown) if "sort=rate" in u)
    assert (args_of(rate)["then"], args_of(rate)["then_order"]) == (
        ["violations"],
        ["asc"],
    )


def test_then_by_nothing_else_and_a_bad_second_column(client):
    add_entry("198.51.100.1")

    plain = client.get("/?sort=type&then=")
    wrong = client.get("/?sort=type&then=country")

    control = page_text(plain).split('class="per-page"')[1].split("</form>")[0]
    assert '<option value="" selected>' not in control
    assert "then by" in control
    assert "then=" not in " ".join(links(plain))
    assert "&#39;country&#39; is not a column to sort by" in page_text(wrong)


# paging


def test_paging_links_keep_every_filter(client):
    for n in range(35):
        add_entry(f"198.51.100.{n + 1}", "dha", NOON - n)
    add_entry("198.51.100.200", "spam")

    response = client.get(
        "/?type=dha&ip=198.51.100.0/24&from=2026-03-01T00:00&domains=&per_page=10"
        "&sort=ip&order=desc&page=2"
    )

    assert len(shown_ips(response)) == 10
    assert shown_ips(response)[0] == "198.51.100.25"
    paging = page_text(response).split('class="paging"')[1].split("</nav>")[0]
    pages = [html.unescape(href) for href in re.findall(r'href="([^"]*)"', paging)]
    numbers = [args_of(url).get("page", ["1"])[0] for url in pages]
    assert numbers == ["1", "1", "3", "4", "3"]
    for url in pages + [u for u in links(response) if "sort=time" in u]:
        args = args_of(url)
        assert args["type"] == ["dha"]
        assert args["ip"] == ["198.51.100.0/24"]
        assert args["from"] == ["2026-03-01T00:00"]
        assert args["per_page"] == ["10"]


def test_per_page_drop_down_keeps_every_filter(client):
    add_entry("198.51.100.1", "dha")

    response = client.get("/?type=dha&ip=198.51.100.1&sort=rate&per_page=50")

    head = page_text(response).split('class="per-page"')[1].split("</form>")[0]
    hidden = dict(re.findall(r'type="hidden" name="(\w+)" value="([^"]*)"', head))
    assert hidden == {
        "type": "dha",
        "ip": "198.51.100.1",
        "sort": "rate",
        "order": "desc",
    }
    assert '<option value="50" selected>' in head


@pytest.mark.parametrize("per_page", [10, 25, 50, 100])
def test_logs_per_page_choices(client, per_page):
    for n in range(120):
        add_entry(f"10.1.0.{n}", last_seen=NOON - n)

    response = client.get(f"/?per_page={per_page}")

    assert len(shown_ips(response)) == per_page


# wrong input


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("ip=999.1.1.1", "is not an IP address"),
        ("ip=192.0.2.9/24", "did you mean 192.0.2.0/24"),
        # the same words as the sender filtering log's search
        ("ip=fe80::1%25eth0", "zone ids (%) are not sender addresses"),
        ("ip=2001:db8::1%25eth0/64", "zone ids (%) are not sender addresses"),
        ("from=%D9%A2%D9%A0%D9%A2%D9%A6-03-01", "is not a date-time"),
        ("from=2026-03-02T00:00&to=2026-03-01T00:00", "before the"),
        ("from=yesterday", "is not a date-time"),
        ("sort=colour", "is not a column to sort by"),
        ("order=sideways", "asc or desc"),
        ("per_page=7", "logs per page must be one of 10, 25, 50, 100"),
        ("page=0", "whole number from 1"),
        ("type=worm", "is not a threat type"),
    ],
)
def test_wrong_input_gets_a_message_on_the_form(client, query, message):
    add_entry("192.0.2.1")

    response = client.get(f"/?{query}")

    assert response.status_code == 200
    assert message in html.unescape(page_text(response))
    assert "Display Log" in page_text(response)
    assert shown_ips(response) == []


def test_page_past_the_end_shows_the_last_page(client):
    add_entry("192.0.2.1")

    response = client.get("/?page=9")

    assert shown_ips(response) == ["192.0.2.1"]


# blocking


def block_form(entries, action, duration="", back="type=spam&sort=ip&order=asc"):
    """The POST body the block buttons send."""
    return {
        "entry": [str(e.id) for e in entries],
        "action": action,
        "duration": duration,
        "back": back,
    }


def test_block_temporarily_for_a_typed_duration(client):
    entry = add_entry("203.0.113.9")
    add_entry("2001:db8:5:6::/64", "virus")
    v6_entry = SuspiciousEntry.get(SuspiciousEntry.threat_type == "virus")

    response = client.post(
        "/suspicious/block", data=block_form([entry, v6_entry], "temporary", "30m")
    )

    assert response.status_code == 302
    assert args_of(response.location) == {
        "type": ["spam"],
        "per_page": ["25"],
        "sort": ["ip"],
        "order": ["asc"],
    }
    blocks = {b.target: b for b in Block.select()}
    assert set(blocks) == {"203.0.113.9", "2001:db8:5:6::/64"}
    for block in blocks.values():
        assert block.action == "temporary"
        assert block.expires_at - block.created_at == 1800
        assert block.created_by == "admin:alice"
    followed = client.get(response.location)
    assert "203.0.113.9 blocked for 30m." in page_text(followed)
    assert "2001:db8:5:6::/64 blocked for 30m." in page_text(followed)


def test_block_temporarily_defaults_to_the_rule_duration(client):
    Rule.update(duration=7200).where(Rule.threat_type == "dha").execute()
    entry = add_entry("203.0.113.9", "dha")

    response = client.post(
        "/suspicious/block",
        data=block_form([entry], "temporary"),
        follow_redirects=True,
    )

    block = Block.get(Block.target == "203.0.113.9")
    assert block.expires_at - block.created_at == 7200
    assert "203.0.113.9 blocked for 2h (the dha rule&#39;s)." in page_text(response)


def test_block_permanently(client):
    entry = add_entry("203.0.113.9", "virus")

    response = client.post(
        "/suspicious/block",
        data=block_form([entry], "permanent"),
        follow_redirects=True,
    )

    block = Block.get(Block.target == "203.0.113.9")
    assert (block.action, block.expires_at, block.threat_type) == (
        "permanent",
        None,
        "virus",
    )
    assert "203.0.113.9 blocked permanently." in page_text(response)


def test_block_reason_and_evidence_count_one_violation_in_the_singular(client):
    one = add_entry("203.0.113.9", "virus", violations=1, messages=1)
    more = add_entry("203.0.113.10", "virus", violations=2, messages=3)

    client.post("/suspicious/block", data=block_form([one, more], "permanent"))
    evidence = page_text(client.get(f"/suspicious/{one.id}"))

    reasons = {block.target: block.reason for block in Block.select()}
    assert reasons == {
        "203.0.113.9": "by hand from the Suspicious IP log: virus, "
        "1 violation in 1 message",
        "203.0.113.10": "by hand from the Suspicious IP log: virus, "
        "2 violations in 3 messages",
    }
    assert '<dd id="violations">1 violation in 1 message (100.0%)</dd>' in evidence


def test_blocked_entry_links_to_its_block(client):
    entry = add_entry("203.0.113.9")
    client.post("/suspicious/block", data=block_form([entry], "permanent"))
    block = Block.get()

    response = client.get("/")

    assert f'href="/blocks#block-{block.id}">blocked</a>' in page_text(response)


def test_blocking_an_approved_address_is_refused_with_the_reason(client):
    service.approve("198.51.100.0/24", actor="test")
    approved = add_entry("198.51.100.7")
    other = add_entry("203.0.113.9")

    response = client.post(
        "/suspicious/block",
        data=block_form([approved, other], "temporary", "1h"),
        follow_redirects=True,
    )

    assert [b.target for b in Block.select()] == ["203.0.113.9"]
    text = page_text(response)
    refusals = re.findall(r'<li class="flash-refused">([^<]*)</li>', text)
    assert len(refusals) == 1
    assert refusals[0].startswith("198.51.100.7 not blocked: ")
    assert "covers approved 198.51.100.0/24" in refusals[0]


def test_blocking_an_already_blocked_address_says_so(client):
    service.block("203.0.113.0/24", duration=None, actor="test")
    entry = add_entry("203.0.113.9")

    response = client.post(
        "/suspicious/block",
        data=block_form([entry], "permanent"),
        follow_redirects=True,
    )

    assert Block.select().count() == 1
    assert "203.0.113.9 not blocked: already blocked by 203.0.113.0/24 (permanent)" in (
        page_text(response)
    )


@pytest.mark.parametrize(
    ("form", "message"),
    [
        ({"action": "temporary", "duration": "1h"}, "Tick at least one row"),
        ({"action": "temporary", "duration": "soon"}, "is not a duration"),
        ({"action": "temporary", "duration": "31d"}, "1 second to 30 days"),
        ({"action": "temporary", "duration": "\u0663\u0660m"}, "is not a duration"),
        ({"action": "explode"}, "Choose Block Temporarily or Block Permanently"),
        ({"action": "permanent", "entry": "x"}, "not entries of the log"),
        ({"action": "permanent", "entry": "999"}, "no longer in the log"),
    ],
)
def test_wrong_block_form_gets_a_message(client, form, message):
    entry = add_entry("203.0.113.9")
    data = {"back": "sort=ip", "entry": str(entry.id), **form}
    if "Tick" in message:
        del data["entry"]

    response = client.post("/suspicious/block", data=data)

    assert response.status_code == 200
    assert message in page_text(response)
    assert Block.select().count() == 0


def csrf_token(response):
    """The CSRF token a page's forms carry."""
    return re.search(r'name="csrf_token" value="([^"]+)"', page_text(response))[1]


def test_forms_without_csrf_token_are_rejected(settings):
    client = make_app(settings).test_client()
    credentials = {"username": "alice", "password": PASSWORD}
    login_token = csrf_token(client.get("/login"))
    entry = add_entry("203.0.113.9")

    refused_login = client.post("/login", data=credentials)
    login = client.post("/login", data={**credentials, "csrf_token": login_token})
    token = csrf_token(client.get("/"))
    refused = client.post("/suspicious/block", data=block_form([entry], "permanent"))
    accepted = client.post(
        "/suspicious/block",
        data={**block_form([entry], "permanent"), "csrf_token": token},
    )

    assert refused_login.status_code == 400
    assert login.status_code == 302
    assert refused.status_code == 400
    assert "The form could not be accepted" in page_text(refused)
    assert accepted.status_code == 302
    assert Block.select().count() == 1


# blocked list


def test_blocked_list_shows_and_unblocks(client):
    service.block("203.0.113.9", duration=3600, actor="admin:bob", reason="noisy")
    service.block("2001:db8:9::/48", duration=None, actor="rule:spam", reason="rate")

    listing = page_text(client.get("/blocks"))
    response = client.post(
        "/blocks/unblock", data={"target": "203.0.113.9"}, follow_redirects=True
    )

    assert "203.0.113.9" in listing and "admin:bob" in listing and "noisy" in listing
    assert "2001:db8:9::/48" in listing and "permanent" in listing
    assert "Unblocked 203.0.113.9." in page_text(response)
    lifted = Block.get(Block.target == "203.0.113.9")
    assert lifted.lifted_at is not None and lifted.lift_reason == "unblocked"
    assert Block.get(Block.target == "2001:db8:9::/48").lifted_at is None


def test_unblocking_what_is_not_blocked_says_so(client):
    response = client.post(
        "/blocks/unblock", data={"target": "192.0.2.1"}, follow_redirects=True
    )

    assert "Not unblocked: 192.0.2.1 is not blocked." in page_text(response)


# domain names


@pytest.fixture
def dnsmasq():
    """A dnsmasq on loopback serving PTR records for three test senders."""
    names = {
        "203.0.113.9": "mail.example.net",
        "203.0.113.10": "<script>hostile</script>.example",
        "2001:db8:1:2::": "v6.example.net",
    }
    with Dnsmasq(names) as server:
        yield server.port


def test_domain_column_shows_ptr_names_as_text(make_settings, dnsmasq):
    settings = make_settings(f'[dns]\nnameservers = ["127.0.0.1:{dnsmasq}"]\n')
    client = make_app(settings, WTF_CSRF_ENABLED=False).test_client()
    client.post("/login", data={"username": "alice", "password": PASSWORD})
    add_entry("203.0.113.9")
    add_entry("203.0.113.10")
    add_entry("203.0.113.11")
    add_entry("2001:db8:1:2::/64")

    response = client.get("/?domains=1&sort=ip")

    text = page_text(response)
    domains = re.findall(r'<td class="domain">([^<]*)</td>', text)
    assert domains == [
        "mail.example.net",
        "&lt;script&gt;hostile&lt;/script&gt;.example",
        "(no name)",
        "v6.example.net",
    ]
    assert "<script>hostile" not in text
    assert "<th>Domain</th>" in text
    assert "<th>Domain</th>" not in page_text(client.get("/?sort=ip"))


def test_silent_nameserver_never_stalls_the_page(make_settings):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        port = silent.getsockname()[1]
        settings = make_settings(f'[dns]\nnameservers = ["127.0.0.1:{port}"]\n')
        client = make_app(settings, WTF_CSRF_ENABLED=False).test_client()
        client.post("/login", data={"username": "alice", "password": PASSWORD})
        for n in range(100):
            add_entry(f"198.51.100.{n}")

        started = time.monotonic()
        response = client.get("/?domains=1&per_page=100")
        elapsed = time.monotonic() - started

    assert response.status_code == 200
    assert elapsed < 1.5
    domains = re.findall(r'<td class="domain">([^<]*)</td>', page_text(response))
    assert domains == ["(timed out)"] * 100


@pytest.mark.parametrize(
    ("backend", "age", "notice"),
    [
        ("dry-run", 0, "Enforcement is DRY-RUN"),
        ("kernel", 0, None),
        (
            "kernel",
            120,
            "The daemon is not running: new blocks, unblocks and changes do not "
            "reach the kernel until it runs again. What the kernel held at its "
            "last check still acts, and temporary entries still end on time.",
        ),
    ],
)
def test_banner_says_when_blocks_are_not_enforced(client, backend, age, notice):
    service.publish_state(enforcement=backend, heartbeat=0)
    ApplianceState.update(updated_at=time.time() - age).execute()

    text = client.get("/blocks").text

    if notice:
        assert notice in text
    else:
        assert 'class="notice"' not in text


def test_silent_daemon_banner_keeps_the_last_error(client):
    error = "IPv4 rule of chain SENDER_FILTER is missing and could not be put back"
    service.publish_state(enforcement="kernel", heartbeat=0, enforcement_error=error)
    ApplianceState.update(updated_at=time.time() - 120).execute()

    text = client.get("/blocks").text

    assert "The daemon is not running" in text
    assert f"Its last check found: ENFORCEMENT ERROR: {error}." in text


def test_log_sources_page_counts_lines_not_understood(client, settings, tmp_path):
    log_path = tmp_path / "mail.log"
    log_path.write_text(
        "Dec  4 10:00:00 mx1 postfix/smtpd[1]: connect from unknown[192.0.2.9]\n"
        "this is not a mail log line\n"
    )
    assert cli.main(["ingest", "--config", str(settings.path), str(log_path)]) == 0

    text = page_text(client.get("/sources"))

    cells = re.findall(r"<td[^>]*>([^<]*)</td>", text)
    assert cells[:4] == [str(log_path), "2", "1", "0"]
