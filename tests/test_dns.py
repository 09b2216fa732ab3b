"""Show domain names: PTR lookups against a real dnsmasq on loopback (SPEC §4, §9)."""

import re
import time

import pytest
from dnsserver import HOSTILE_SHOWN
from dnsserver import OVERSIZE_NAME
from dnsserver import PTR_NAMES
from dnsserver import DeadResolver
from dnsserver import Dnsmasq
from dnsserver import SlowRelay
from dnsserver import numbered_ptr_names
from test_web import PASSWORD
from test_web import add_entry
from test_web import make_app

from appliance.config import ConfigError
from web.dns import LOOKUP_FAILED
from web.dns import NO_NAME
from web.dns import TIMED_OUT
from web.dns import DomainName
from web.dns import PtrLookup
from web.dns import make_resolver

HUNDRED = numbered_ptr_names(100)


@pytest.fixture(scope="module")
def dnsmasq():
    """One dnsmasq for the module: the standard test names and 100 numbered ones."""
    with Dnsmasq({**PTR_NAMES, **HUNDRED}) as server:
        yield server


@pytest.fixture
def relay(dnsmasq):
    """dnsmasq behind a resolver that answers each query 50 ms late."""
    with SlowRelay(dnsmasq.port, delay=0.05) as slow:
        yield slow


@pytest.fixture
def lookup(relay):
    """A PtrLookup asking the 50 ms resolver."""
    ptr = PtrLookup([relay.nameserver], timeout=1.0)
    yield ptr
    ptr.close()


def console(make_settings, nameserver):
    """A logged-in test client whose console asks `nameserver` for names."""
    settings = make_settings(f'[dns]\nnameservers = ["{nameserver}"]\n')
    client = make_app(settings, WTF_CSRF_ENABLED=False).test_client()
    client.post("/login", data={"username": "alice", "password": PASSWORD})
    return client


def domain_cells(response):
    """Each Domain cell of the table as (its attributes, its text), as sent."""
    text = response.get_data(as_text=True)
    return re.findall(r'<td class="domain"([^>]*)>([^<]*)</td>', text)


def wait_until_settled(ptr, seconds=3.0):
    """Wait until no lookup of `ptr` is still running."""
    deadline = time.monotonic() + seconds
    while ptr.pending and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not ptr.pending


# the lookups


def test_names_come_from_the_dns_server_as_served(lookup):
    found = lookup.names(PTR_NAMES)

    assert found == {
        "192.0.2.1": "mail.example.net",
        "192.0.2.2": HOSTILE_SHOWN,
        "192.0.2.3": OVERSIZE_NAME,
        "192.0.2.4": NO_NAME,
        "2001:db8:1:2::": "v6.example.net",
    }


def test_a_name_is_asked_for_once_then_served_from_the_cache(lookup, relay):
    first = lookup.names(["192.0.2.1", "192.0.2.4"])
    second = lookup.names(["192.0.2.1", "192.0.2.4", "192.0.2.1"])

    assert first == second == {"192.0.2.1": "mail.example.net", "192.0.2.4": NO_NAME}
    assert relay.queries == 2


def test_cached_names_and_failures_expire_after_their_ttl(relay):
    now = [1000.0]
    ptr = PtrLookup([relay.nameserver], timeout=1.0, clock=lambda: now[0])
    ptr.names(["192.0.2.1", "192.0.2.4"])

    # dnsmasq serves its records with TTL 0: a name is kept the 60 s floor
    now[0] += 59
    ptr.names(["192.0.2.1", "192.0.2.4"])
    queries_within_a_minute = relay.queries
    now[0] += 2
    ptr.names(["192.0.2.1", "192.0.2.4"])
    queries_after_a_minute = relay.queries
    now[0] += 240
    ptr.names(["192.0.2.4"])
    ptr.close()

    assert queries_within_a_minute == 2
    # the name is asked for again, the failure (kept 300 s) is not
    assert queries_after_a_minute == 3
    assert relay.queries == 4


def test_the_cache_keeps_at_most_its_limit_dropping_the_least_recently_used(relay):
    ptr = PtrLookup([relay.nameserver], timeout=1.0, cache_limit=2)

    ptr.names(["192.0.2.1"])
    ptr.names(["192.0.2.4"])
    ptr.names(["192.0.2.1"])
    ptr.names(["2001:db8:1:2::"])
    kept = list(ptr.cache)
    ptr.close()

    assert kept == ["192.0.2.1", "2001:db8:1:2::"]
    assert relay.queries == 3


def test_an_answer_after_the_budget_shows_timed_out_then_fills_the_cache(dnsmasq):
    with SlowRelay(dnsmasq.port, delay=0.3) as slow:
        ptr = PtrLookup([slow.nameserver], timeout=1.0)

        hurried = ptr.names(["192.0.2.1"], budget=0.05)
        wait_until_settled(ptr)
        later = ptr.names(["192.0.2.1"], budget=0.05)
        ptr.close()

        assert hurried == {"192.0.2.1": TIMED_OUT}
        assert later == {"192.0.2.1": "mail.example.net"}
        assert slow.queries == 1


@pytest.fixture(scope="module")
def refusing():
    """dnsmasq answering REFUSED for an address it has no record of."""
    with Dnsmasq(PTR_NAMES, refusing=True) as server:
        yield server


@pytest.fixture(scope="module")
def failing(dnsmasq):
    """A validating dnsmasq in front of the unsigned one: SERVFAIL to everything."""
    with Dnsmasq({}, failing_via=dnsmasq) as server:
        yield server


def test_refused_and_servfail_show_as_a_failed_lookup_not_as_no_name(refusing, failing):
    by_refusing = PtrLookup([refusing.nameserver], timeout=1.0)
    by_failing = PtrLookup([failing.nameserver], timeout=1.0)

    refused = by_refusing.names(["192.0.2.1", "192.0.2.4"])
    failed = by_failing.names(["192.0.2.1", "192.0.2.4"])
    by_refusing.close()
    by_failing.close()

    assert refused == {"192.0.2.1": "mail.example.net", "192.0.2.4": LOOKUP_FAILED}
    assert failed == {"192.0.2.1": LOOKUP_FAILED, "192.0.2.4": LOOKUP_FAILED}


def test_a_failed_lookup_is_kept_30_seconds_only(refusing):
    now = [1000.0]
    with SlowRelay(refusing.port, delay=0.0) as counting:
        ptr = PtrLookup([counting.nameserver], timeout=1.0, clock=lambda: now[0])
        first = ptr.names(["192.0.2.4"])
        now[0] += 29
        cached = ptr.names(["192.0.2.4"])
        queries_within = counting.queries
        now[0] += 2
        again = ptr.names(["192.0.2.4"])
        ptr.close()

        assert first == cached == again == {"192.0.2.4": LOOKUP_FAILED}
        assert queries_within == 1
        assert counting.queries == 2


def test_a_failed_lookup_says_so_on_the_page(make_settings, failing):
    client = console(make_settings, failing.nameserver)
    add_entry("192.0.2.1")

    response = client.get("/?domains=1")

    assert domain_cells(response) == [("", "(lookup failed)")]


def test_a_long_name_is_shortened_around_an_ellipsis():
    name = DomainName(OVERSIZE_NAME)

    assert name.shortened
    assert name.shown == "a" * 21 + "\u2026" + "d" * 34 + ".example"
    assert len(name.shown) == 64
    assert not DomainName("mail.example.net").shortened
    assert DomainName("mail.example.net").shown == "mail.example.net"


# the page


def test_hostile_name_renders_as_inert_text(make_settings, relay):
    client = console(make_settings, relay.nameserver)
    for address in PTR_NAMES:
        add_entry(address if ":" not in address else f"{address}/64")

    response = client.get("/?domains=1&sort=ip&order=asc")

    text = response.get_data(as_text=True)
    assert domain_cells(response) == [
        ("", "mail.example.net"),
        (
            "",
            "&lt;script&gt;document.title=&#39;pwned&#39;&lt;/script&gt;"
            ".x\\&#34;y&amp;z.example",
        ),
        (f' title="{OVERSIZE_NAME}"', "a" * 21 + "\u2026" + "d" * 34 + ".example"),
        ("", NO_NAME),
        ("", "v6.example.net"),
    ]
    assert "<script>document" not in text


def hundred_row_console(make_settings, nameserver):
    """A console over the 100 numbered senders, its templates compiled."""
    client = console(make_settings, nameserver)
    for address in HUNDRED:
        add_entry(address)
    client.get("/?per_page=100")
    return client


def timed_view(client, url):
    """(the response, the seconds it took)."""
    started = time.monotonic()
    response = client.get(url)
    return response, time.monotonic() - started


def test_hundred_row_page_with_a_50ms_resolver_answers_within_half_a_second(
    make_settings, relay
):
    client = hundred_row_console(make_settings, relay.nameserver)

    response, elapsed = timed_view(client, "/?domains=1&per_page=100&sort=ip")

    assert response.status_code == 200
    assert [shown for _, shown in domain_cells(response)] == list(HUNDRED.values())
    # one query per address, side by side: one after another would take 5 s
    assert relay.queries == 100
    assert elapsed < 0.5


def test_hundred_row_page_with_a_dead_resolver_answers_within_1_5_seconds(
    make_settings,
):
    with DeadResolver() as dead:
        client = hundred_row_console(make_settings, dead.nameserver)

        first, first_elapsed = timed_view(client, "/?domains=1&per_page=100")
        wait_until_settled(client.application.extensions["ptr_lookup"])
        again, again_elapsed = timed_view(client, "/?domains=1&per_page=100")

    assert first.status_code == again.status_code == 200
    assert domain_cells(first) == [("", TIMED_OUT)] * 100
    assert first_elapsed < 1.5
    # the timeouts are remembered for a minute: the next view does not wait
    assert domain_cells(again) == [("", TIMED_OUT)] * 100
    assert again_elapsed < 0.5


def test_nameservers_are_read_with_or_without_a_port():
    resolver = make_resolver(["192.0.2.53", "198.51.100.53:5353", "[2001:db8::53]:54"])

    servers = [(server.address, server.port) for server in resolver.nameservers]

    assert servers == [
        ("192.0.2.53", 53),
        ("198.51.100.53", 5353),
        ("2001:db8::53", 54),
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("ns.example.net", "dns nameserver 'ns.example.net' is not IP or IP:port"),
        ("192.0.2.53:dns", "dns nameserver '192.0.2.53:dns' is not IP or IP:port"),
        ("192.0.2.53:0", "dns nameserver '192.0.2.53:0' has a port outside 1-65535"),
    ],
)
def test_a_bad_nameserver_is_a_config_error_that_names_it(text, message):
    with pytest.raises(ConfigError) as refusal:
        make_resolver([text])

    assert str(refusal.value) == message
