"""What the browser tests share: fixed data, process helpers, page helpers.

tests/test_browser.py drives the console with these; the data is fixed, so
every view of it has exact rows to expect.
"""

import json
import socket
import subprocess
import time
from dataclasses import dataclass
from datetime import UTC
from datetime import datetime
from pathlib import Path

from dnsserver import HOSTILE_NAME
from dnsserver import OVERSIZE_NAME
from dnsserver import numbered_ptr_names

from appliance import addresses
from appliance import models
from appliance import service
from appliance.models import SuspiciousEntry

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    # nothing but loopback: other hosts go to a closed port and resolve to nothing
    "--proxy-server=http://127.0.0.1:9",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
]
SCREENSHOTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "screenshots"
PASSWORD = "browser test password"
NOON = datetime(2026, 3, 1, 12, 0, tzinfo=UTC).timestamp()
TYPES = ("spam", "virus", "dha", "bounce")
TITLE = "Suspicious IP log · Sender Filter"
# the day of the filled episodes: later tests add episodes of today
MARCH_1 = "from=2026-02-28&to=2026-03-01"
DOMAINS = {
    **numbered_ptr_names(31),
    "203.0.113.2": HOSTILE_NAME,
    "203.0.113.3": OVERSIZE_NAME,
    "203.0.113.4": None,
}


def sender(n):
    """The test senders: 203.0.113.1 to .30, then two IPv6 /64s."""
    if n <= 30:
        return f"203.0.113.{n}"
    return f"2001:db8:{n}::/64"


def entry_values(n):
    """Sender n's episode: type by n % 4, last seen n minutes after noon."""
    if n <= 30:
        return {
            "threat_type": TYPES[n % 4],
            "last_seen": NOON + n * 60,
            "violations": n,
            "messages": 100,
        }
    return {
        "threat_type": "spam",
        "last_seen": NOON - 3 * 3600,
        "violations": n + 20,
        "messages": 200,
    }


ENTRIES = {sender(n): entry_values(n) for n in range(1, 33)}


def fill_database(settings):
    """The rules, an administrator, and one episode per test sender."""
    models.connect(settings.database)
    models.db.create_tables(models.ALL_MODELS, safe=True)
    service.configure(settings)
    service.seed_rules(settings)
    service.add_admin("alice", PASSWORD)
    for ip, values in ENTRIES.items():
        network = addresses.parse_network(ip)
        SuspiciousEntry.create(
            sender=ip,
            sender_key=addresses.key_of(network.network_address),
            first_seen=values["last_seen"] - 600,
            rate=round(values["violations"] * 100 / values["messages"], 2),
            **values,
        )


def free_tcp_port():
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_port(port, process, seconds=15.0):
    """Wait until something accepts TCP connections on 127.0.0.1:`port`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"sender-filter web exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"sender-filter web did not listen on {port}")


@dataclass
class Console:
    """The running appliance: the console's URL, an API token, its directory."""

    url: str
    token: str
    directory: Path


def stop(process):
    """End a process this module started and wait for it."""
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)


def screenshot(tab, name):
    """Save the whole page as test-artifacts/screenshots/NAME.png."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    tab.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def utc_text(ts):
    """An epoch time as the console writes it."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


def ip_column(tab):
    """The IP column of the Suspicious IP log, top to bottom."""
    return tab.locator("table.log td.ip").all_inner_texts()


def expected_order(senders, column, order, then=None, then_order="desc"):
    """Senders sorted as the log sorts: the column, then the `then` column if any,
    then last seen and the row id in the direction of the last column named."""
    ids = {ip: n for n, ip in enumerate(ENTRIES, start=1)}

    def value(ip, key):
        values = ENTRIES[ip]
        return {
            "violations": values["violations"],
            "type": values["threat_type"],
            "time": values["last_seen"],
        }[key]

    tie = then_order if then else order
    keys = [(column, order)] + ([(then, then_order)] if then else [])
    keys.append(("time", tie))
    ordered = sorted(senders, key=lambda ip: ids[ip], reverse=tie == "desc")
    # stable sorts, least significant key first
    for key, direction in reversed(keys):
        ordered.sort(key=lambda ip: value(ip, key), reverse=direction == "desc")
    return ordered


def wait_for_kernel_check(blocks, seconds=15.0):
    """Wait until the daemon has recorded whether each block is enforced."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = {b.target: b.enforced for b in service.active_blocks()}
        if set(found) == set(blocks) and None not in found.values():
            return found
        time.sleep(0.25)
    raise AssertionError(f"the daemon did not check {sorted(blocks)} in {seconds} s")


def wait_for_page(tab, url, selector, seconds=20.0):
    """Load `url` until `selector` is on it (the daemon works in the background)."""
    deadline = time.monotonic() + seconds
    while True:
        tab.goto(url)
        if tab.locator(selector).count():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{selector} did not appear on {url} in {seconds} s")
        time.sleep(0.5)


def post_spam(tab, console, ip, count):
    """Report `count` spam messages from `ip` through the events API, a minute ago."""
    now = time.time()
    events = [
        {"time": now - 60 + n, "ip": ip, "message": True, "verdicts": ["spam"]}
        for n in range(count)
    ]
    response = tab.request.post(
        f"{console.url}/api/v1/events",
        data=json.dumps(events),
        headers={
            "Authorization": f"Bearer {console.token}",
            "Content-Type": "application/json",
        },
    )
    assert (response.status, response.json()) == (202, {"accepted": count})
    return events


def row_cells(tab, table, ip):
    """The cells of the row of `table` whose IP cell is exactly `ip`."""
    row = tab.locator(f"{table} tbody tr", has=tab.locator(f"td.ip:text-is('{ip}')"))
    return row.locator("td").all_inner_texts()
