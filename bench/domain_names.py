"""The 100-row Suspicious IP page with "Show domain names", for bench/console.

Times the page against a resolver answering in 50 ms and against one that
never answers, each page with a cold name cache, and beside them the same
PTR lookups made one after another through dnspython against the same 50 ms
resolver in the same run. The DNS servers are the tests' own (tests/dnsserver.py:
Debian's dnsmasq, a delaying relay, a dead port), all on loopback. Prints
figures; asserts nothing. SPEC §9: under 0.5 s and under 1.5 s.
"""

import importlib
import re
import shutil
import statistics
import sys
import time
from pathlib import Path

import dns.exception

from appliance import models
from appliance.queries import SuspiciousQuery
from web.dns import PtrLookup
from web.dns import lookup_address
from web.dns import make_resolver

TESTS = Path(__file__).resolve().parents[1] / "tests"
PAGE_ARGS = {"domains": "1", "per_page": "100"}
RESOLVER_DELAY = 0.05
NAME = re.compile(r"bench-\d+\.example\.org")
TIMED_OUT_CELL = re.compile(r'<td class="domain"[^>]*>\(timed out\)</td>')


def dns_servers():
    """tests/dnsserver.py, once dnsmasq is known to be there."""
    if not (shutil.which("dnsmasq") or Path("/usr/sbin/dnsmasq").exists()):
        sys.exit("the domain-name figures need dnsmasq (make system-packages)")
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    return importlib.import_module("dnsserver")


def page_addresses(ipv6_prefix):
    """The addresses the page looks up, in row order, each once."""
    query, _errors = SuspiciousQuery.from_args(PAGE_ARGS, ipv6_prefix=ipv6_prefix)
    models.db.connect(reuse_if_open=True)
    rows = query.run().rows
    models.db.close()
    return list(dict.fromkeys(lookup_address(entry.sender) for entry in rows))


def cold_page(client, nameserver, timeout):
    """(seconds, body) of the page with a fresh PtrLookup asking `nameserver`."""
    extensions = client.application.extensions
    extensions["ptr_lookup"].close()
    extensions["ptr_lookup"] = PtrLookup((nameserver,), timeout)

    started = time.perf_counter()
    response = client.get("/", query_string=PAGE_ARGS)
    elapsed = time.perf_counter() - started

    body = response.get_data(as_text=True)
    if response.status_code != 200 or 'class="log"' not in body:
        sys.exit(f"domain names page: status {response.status_code}, no table")
    return elapsed, body


def plain_pages(client, runs):
    """Seconds of the same page without domain names, `runs` times."""
    args = {**PAGE_ARGS, "domains": ""}
    spent = []
    for _ in range(runs):
        started = time.perf_counter()
        client.get("/", query_string=args)
        spent.append(time.perf_counter() - started)
    return spent


def serial_lookups(addresses, nameserver, timeout):
    """Seconds for the PTR lookups one after another; (seconds, names found)."""
    resolver = make_resolver((nameserver,))
    found = 0
    started = time.perf_counter()
    for address in addresses:
        try:
            resolver.resolve_address(address, lifetime=timeout)
        except dns.exception.DNSException:
            continue
        found += 1
    return time.perf_counter() - started, found


def line(label, seconds, note=""):
    """One figure: how many runs, p50 and max in seconds, and a note."""
    return (
        f"  {label:<24} n={len(seconds):<2} p50 {statistics.median(seconds):6.3f} s"
        f"  max {max(seconds):6.3f} s  {note}"
    ).rstrip()


def measure(client, settings, runs, serial_runs):
    """Measure the page and the serial anchor; returns the lines to print."""
    servers = dns_servers()
    addresses = page_addresses(settings.ipv6_prefix)
    names = {address: f"bench-{n}.example.org" for n, address in enumerate(addresses)}
    timeout = settings.dns_timeout
    fast, fast_found, queries, dead, dead_out, serial = [], [], [], [], [], []

    with servers.Dnsmasq(names) as dnsmasq:
        with servers.SlowRelay(dnsmasq.port, RESOLVER_DELAY) as relay:
            for _ in range(runs):
                asked = relay.queries
                elapsed, body = cold_page(client, relay.nameserver, timeout)
                fast.append(elapsed)
                fast_found.append(len(set(NAME.findall(body))))
                queries.append(relay.queries - asked)
            for _ in range(serial_runs):
                elapsed, found = serial_lookups(addresses, relay.nameserver, timeout)
                serial.append(elapsed)
                if found != len(addresses):
                    sys.exit(f"serial lookups found {found} of {len(addresses)} names")
        with servers.DeadResolver() as resolver:
            for _ in range(runs):
                elapsed, body = cold_page(client, resolver.nameserver, timeout)
                dead.append(elapsed)
                dead_out.append(len(TIMED_OUT_CELL.findall(body)))
    plain = plain_pages(client, runs)
    client.application.extensions["ptr_lookup"].close()

    count = len(addresses)
    serial_page = statistics.median(plain) + statistics.median(serial)
    ratio = serial_page / statistics.median(fast)
    return [
        f'Suspicious IP page, 100 rows, "Show domain names": {count} addresses '
        f"to look up (dnspython, timeout {timeout:g} s)",
        "  each page timed cold: a fresh PtrLookup, so an empty name cache",
        line("without domain names", plain),
        line(
            f"resolver at {RESOLVER_DELAY * 1000:.0f} ms",
            fast,
            f"names shown {min(fast_found)}-{max(fast_found)} of {count}, relay "
            f"queries {min(queries)}-{max(queries)}; bar < 0.5 s",
        ),
        line(
            "dead resolver",
            dead,
            f"rows shown timed out {min(dead_out)}-{max(dead_out)}; bar < 1.5 s",
        ),
        line(
            "serial lookups",
            serial,
            f"the same {count} PTR lookups one after another, same resolver",
        ),
        f"  page with serial lookups ~{serial_page:.3f} s (page without names "
        f"+ serial lookups): {ratio:.1f}x the parallel page",
    ]
