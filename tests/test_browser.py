"""The console in a real browser: Debian's Chromium, headless, driven by Playwright.

`sender-filter web` and `sender-filter run` (dry-run backend) serve a database
filled with fixed episodes (tests/browserlab.py); the browser logs in and works
the pages as an administrator would. Domain names come from a real dnsmasq on
loopback. Every page visited is saved as a screenshot under
test-artifacts/screenshots/. The browser may reach loopback only: a proxy
address where nothing listens and a resolver rule that answers nothing stand
in for any other host. The tests run in file order over one appliance.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import pytest
from browserlab import CHROMIUM
from browserlab import CHROMIUM_ARGS
from browserlab import DOMAINS
from browserlab import ENTRIES
from browserlab import MARCH_1
from browserlab import PASSWORD
from browserlab import TITLE
from browserlab import TYPES
from browserlab import Console
from browserlab import expected_order
from browserlab import fill_database
from browserlab import free_tcp_port
from browserlab import ip_column
from browserlab import post_spam
from browserlab import row_cells
from browserlab import screenshot
from browserlab import stop
from browserlab import utc_text
from browserlab import wait_for_kernel_check
from browserlab import wait_for_page
from browserlab import wait_for_port
from conftest import require
from dnsserver import OVERSIZE_NAME
from dnsserver import Dnsmasq
from playwright.sync_api import sync_playwright

from appliance import api_tokens
from appliance import config
from appliance import models
from appliance import service
from appliance.daemon import RULES_EVERY


@pytest.fixture(scope="module")
def dnsmasq():
    """dnsmasq on loopback with PTR names for the test senders."""
    with Dnsmasq(DOMAINS) as server:
        yield server


@pytest.fixture(scope="module")
def console(tmp_path_factory, dnsmasq):
    """`sender-filter web` and `sender-filter run` (dry-run) over a filled database.

    The console listens on a free port of 127.0.0.1; the daemon follows the
    events spool that the API writes, with the dry-run enforcement backend.
    """
    command = shutil.which("sender-filter") or str(
        Path(sys.executable).with_name("sender-filter")
    )
    require(Path(command).exists(), "needs the sender-filter command (make test)")
    directory = tmp_path_factory.mktemp("console")
    port = free_tcp_port()
    config_path = directory / "config.toml"
    config_path.write_text(
        '[database]\npath = "sender-filter.db"\n'
        f'[web]\nport = {port}\nsecret_key_file = "secret_key"\n'
        '[enforcement]\nbackend = "dry-run"\n'
        f'[dns]\nnameservers = ["{dnsmasq.nameserver}"]\n'
    )
    settings = config.load(config_path)
    fill_database(settings)
    token = api_tokens.create_token("browser-test")

    with ExitStack() as stack:
        web_log = stack.enter_context(open(directory / "web.log", "w"))
        daemon_log = stack.enter_context(open(directory / "daemon.log", "w"))
        base = [command, "--config", str(config_path)]
        for subcommand, log_file in (("web", web_log), ("run", daemon_log)):
            process = subprocess.Popen(
                [*base, subcommand], stdout=log_file, stderr=subprocess.STDOUT
            )
            stack.callback(stop, process)
            if subcommand == "web":
                wait_for_port(port, process)
        yield Console(f"http://127.0.0.1:{port}", token, directory)
    models.db.close()


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium, headless; never a downloaded browser."""
    require(os.path.exists(CHROMIUM), "needs Debian's chromium (make test)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, console):
    """A fresh browser session, logged in as alice through the login form."""
    context = browser.new_context(
        base_url=console.url, viewport={"width": 1400, "height": 900}
    )
    context.set_default_timeout(10000)
    tab = context.new_page()
    # the pages' Content-Security-Policy must refuse nothing they need
    refused = []
    tab.on(
        "console",
        lambda message: (
            refused.append(message.text)
            if "Content Security Policy" in message.text
            else None
        ),
    )
    tab.goto("/")
    tab.fill("input[name=username]", "alice")
    tab.fill("input[name=password]", PASSWORD)
    tab.click("button:text('Log in')")
    tab.wait_for_url(f"{console.url}/")
    yield tab
    context.close()
    assert refused == []


def test_log_in_and_filter_by_type_dates_and_ip(page):
    assert page.title() == TITLE
    page.goto(f"/?{MARCH_1}")
    assert len(ip_column(page)) == 25

    for threat_type in TYPES:
        page.check(f"input[name=type][value={threat_type}]")
        if threat_type != "virus":
            page.uncheck(f"input[name=type][value={threat_type}]")
    page.fill("input[name=from]", "2026-03-01T12:05")
    page.fill("input[name=to]", "2026-03-01T12:15")
    page.fill("input[name=ip]", "203.0.113.0/28")
    page.click("button:text('Display Log')")
    page.wait_for_load_state()

    # virus is n % 4 == 1; seen from 12:05 (n >= 5), begun by 12:15 (n < 26),
    # in 203.0.113.0/28 (n <= 15); newest first
    assert ip_column(page) == ["203.0.113.13", "203.0.113.9", "203.0.113.5"]
    assert (
        page.locator("table.log tbody tr td:nth-child(3)").all_inner_texts()
        == ["virus"] * 3
    )
    assert "3 entries, page 1 of 1" in page.inner_text("div.table-head")
    for arg in ("type=virus", "from=2026-03-01T12", "ip=203.0.113.0", "to=2026-03-01"):
        assert arg in page.url
    screenshot(page, "suspicious-filtered")


def test_sort_by_two_columns_and_reverse(page):
    page.goto(f"/?{MARCH_1}&per_page=10")

    page.click("table.log th a:text('Violations')")
    by_violations = ip_column(page)
    page.click("table.log th a:text('Violations')")
    by_violations_reversed = ip_column(page)
    page.click("table.log th a:text('Type')")
    by_type = ip_column(page)
    # the second column: the control beside logs per page
    page.select_option("form.per-page select[name=then]", "violations")
    page.select_option("form.per-page select[name=then_order]", "desc")
    page.click("form.per-page button:text('Show')")
    page.wait_for_url("**then=violations**")
    by_type_then_violations = ip_column(page)
    marked = page.inner_text("table.log th:has(a:text('Violations')) .then-key")
    screenshot(page, "suspicious-sorted-two-columns")
    page.click("table.log th a:text('Type')")
    page.wait_for_url("**order=desc**")
    reversed_first = ip_column(page)
    page.click("nav.paging a[rel=next]")
    page.wait_for_url("**page=2**")
    reversed_second = ip_column(page)

    assert by_violations == expected_order(ENTRIES, "violations", "desc")[:10]
    assert by_violations[:3] == ["2001:db8:32::/64", "2001:db8:31::/64", "203.0.113.30"]
    assert by_violations_reversed == expected_order(ENTRIES, "violations", "asc")[:10]
    assert by_type == expected_order(ENTRIES, "type", "asc")[:10]
    # bounce (n % 4 == 3) first; ascending sorts break ties oldest first
    assert by_type[:3] == ["203.0.113.3", "203.0.113.7", "203.0.113.11"]
    # bounce, then dha, each most violations first
    assert by_type_then_violations == [
        *(f"203.0.113.{n}" for n in (27, 23, 19, 15, 11, 7, 3)),
        *(f"203.0.113.{n}" for n in (30, 26, 22)),
    ]
    assert (
        by_type_then_violations
        == expected_order(ENTRIES, "type", "asc", "violations", "desc")[:10]
    )
    assert marked == "then ▼"
    # Type reversed keeps the second column: virus, then spam, most violations first
    assert reversed_first + reversed_second == [
        *(f"203.0.113.{n}" for n in (29, 25, 21, 17, 13, 9, 5, 1)),
        *("2001:db8:32::/64", "2001:db8:31::/64"),
        *(f"203.0.113.{n}" for n in (28, 24, 20, 16, 12, 8, 4)),
        *(f"203.0.113.{n}" for n in (30, 26, 22)),
    ]
    assert "then_order=desc" in page.url
    assert page.get_attribute("th[aria-sort]", "aria-sort") == "descending"


def test_logs_per_page_and_paging_keep_every_filter(page):
    page.goto(f"/?{MARCH_1}&type=spam&type=virus&sort=ip&order=asc")

    page.select_option("form.per-page select[name=per_page]", "10")
    page.wait_for_url("**per_page=10**")
    first = ip_column(page)
    page.click("nav.paging a[rel=next]")
    page.wait_for_url("**page=2**")
    second = ip_column(page)
    screenshot(page, "suspicious-page-2")

    chosen = [ip for ip, v in ENTRIES.items() if v["threat_type"] in ("spam", "virus")]
    assert len(chosen) == 17
    assert first + second == chosen
    assert len(first) == 10
    assert second == [
        "203.0.113.21",
        "203.0.113.24",
        "203.0.113.25",
        "203.0.113.28",
        "203.0.113.29",
        "2001:db8:31::/64",
        "2001:db8:32::/64",
    ]
    for arg in ("type=spam", "type=virus", "sort=ip", "order=asc", "per_page=10"):
        assert arg in page.url
    assert page.locator("input[name=type][value=dha]").is_checked() is False
    assert "17 entries, page 2 of 2" in page.inner_text("div.table-head")


def test_wrong_password_stays_on_the_login_page(browser, console):
    context = browser.new_context(base_url=console.url)
    tab = context.new_page()

    tab.goto("/blocks")
    screenshot(tab, "login")
    tab.fill("input[name=username]", "alice")
    tab.fill("input[name=password]", "not the password")
    tab.click("button:text('Log in')")
    text = tab.inner_text("main")
    context.close()

    assert "/login" in tab.url
    assert "Wrong administrator name or password." in text


def test_show_domain_names_renders_hostile_and_long_names_as_text(page):
    page.goto(f"/?{MARCH_1}&ip=203.0.113.0/29&sort=ip&order=asc")

    page.check("input[name=domains]")
    page.click("button:text('Display Log')")
    page.wait_for_url("**domains=1**")
    cells = page.locator("table.log td.domain")
    shown = cells.all_inner_texts()
    screenshot(page, "suspicious-domain-names")

    assert page.locator("table.log th").nth(4).inner_text() == "Domain"
    assert shown == [
        "host-1.example.org",
        "<script>document.title='pwned'</script>.x\\\"y&z.example",
        "a" * 21 + "\u2026" + "d" * 34 + ".example",
        "(no name)",
        "host-5.example.org",
        "host-6.example.org",
        "host-7.example.org",
    ]
    assert cells.nth(2).get_attribute("title") == OVERSIZE_NAME
    # the name's script never ran and is no element of the page
    assert page.title() == TITLE
    assert page.locator("table.log script").count() == 0


def test_tick_rows_block_temporarily_see_them_listed_and_unblock(page, console):
    page.goto("/?ip=203.0.113.16/30&sort=ip&order=asc")
    assert ip_column(page) == [
        "203.0.113.16",
        "203.0.113.17",
        "203.0.113.18",
        "203.0.113.19",
    ]

    page.check("input[aria-label='Tick 203.0.113.17 virus']")
    page.check("input[aria-label='Tick 203.0.113.18 dha']")
    page.fill("input[name=duration]", "2h")
    started = time.time()
    page.click("button:text('Block Temporarily')")
    page.wait_for_load_state()
    flashes = page.locator("ul.flashes li").all_inner_texts()
    statuses = page.locator("table.log tbody tr td:last-child").all_inner_texts()
    screenshot(page, "suspicious-blocked")

    assert flashes == ["203.0.113.17 blocked for 2h.", "203.0.113.18 blocked for 2h."]
    blocks = {b.target: b for b in service.active_blocks()}
    assert sorted(blocks) == ["203.0.113.17", "203.0.113.18"]
    for block in blocks.values():
        assert block.expires_at - block.created_at == 7200
        assert started - 1 <= block.created_at <= time.time()
        assert block.created_by == "admin:alice"
    assert statuses == [
        "suspicious",
        f"blocked until {utc_text(blocks['203.0.113.17'].expires_at)}",
        f"blocked until {utc_text(blocks['203.0.113.18'].expires_at)}",
        "suspicious",
    ]

    page.click("header nav a:text('Blocked list')")
    page.wait_for_url("**/blocks")
    checked = wait_for_kernel_check(blocks)
    page.reload()
    rows = page.locator("table.log tbody tr")
    listed = page.locator("table.log tbody td.ip").all_inner_texts()
    titles = page.locator("table.log thead th").all_inner_texts()
    until, kernel = (
        [
            rows.nth(i).locator("td").nth(titles.index(title)).inner_text()
            for i in range(rows.count())
        ]
        for title in ("Until", "Kernel")
    )
    screenshot(page, "blocked-list")

    assert listed == ["203.0.113.17", "203.0.113.18"]
    assert until == [utc_text(blocks[ip].expires_at) for ip in listed]
    # the daemon's dry-run backend holds nothing in a kernel, and the page says so
    assert checked == {ip: False for ip in listed}
    assert kernel == ["not enforced (dry-run)"] * len(listed)
    assert "Enforcement is DRY-RUN" in page.inner_text("p.notice")

    for ip in listed:
        row = page.locator(
            "table.log tbody tr", has=page.locator(f"td.ip:text-is('{ip}')")
        )
        row.locator("button:text('Unblock')").click()
        page.wait_for_load_state()
    after = page.locator("table.log tbody td.ip").all_inner_texts()
    flashes = page.locator("ul.flashes li").all_inner_texts()
    screenshot(page, "blocked-list-after-unblock")

    assert after == []
    assert flashes == ["Unblocked 203.0.113.18."]
    assert service.active_blocks() == []


# the pages around the log


def test_change_a_rule_and_see_the_daemon_apply_it(page, console):
    reported = post_spam(page, console, "198.51.100.77", 3)
    wait_for_page(page, "/?ip=198.51.100.77", "table.log td.ip")
    before = row_cells(page, "table.log", "198.51.100.77")

    # the default spam rule wants more than 100 messages: 3 stay suspicious
    assert before[2:] == ["spam", "198.51.100.77", "3", "3", "100.0%", "suspicious"]

    # its evidence, one click away: the three events as the API took them
    page.click("table.log td.num a:text-is('3')")
    page.wait_for_url("**/suspicious/*")
    events = page.locator("table.evidence td.event pre").all_inner_texts()
    screenshot(page, "suspicious-evidence")
    assert [json.loads(event) for event in events] == reported

    page.click("header nav a:text('Rules')")
    spam_rule = page.locator("section#rule-spam")
    spam_rule.locator("input[name=spam-messages]").fill("2")
    spam_rule.locator("button:text('Save spam rule')").click()
    page.wait_for_load_state()
    saved = page.locator("ul.flashes li").all_inner_texts()
    screenshot(page, "rules-saved")

    assert len(saved) == 1 and saved[0].startswith("The spam rule is saved: ")
    assert spam_rule.locator("input[name=spam-messages]").input_value() == "2"

    # the daemon reads the rules back every RULES_EVERY seconds, never restarted
    time.sleep(RULES_EVERY + 1)
    events = post_spam(page, console, "198.51.100.78", 3)
    wait_for_page(page, "/blocks", "table.log td.ip:text-is('198.51.100.78')")
    cells = row_cells(page, "table.log", "198.51.100.78")
    screenshot(page, "blocked-list-rule-block")

    # blocked at the third message, the first over 2, for the rule's hour
    third = events[2]["time"]
    assert cells[2:4] == ["spam", "temporary"]
    assert cells[4] == utc_text(third + 3600)
    assert cells[5:8] == [
        "rule:spam",
        utc_text(third),
        "spam rate 100% over 3 messages",
    ]

    page.click("header nav a:text('Rules')")
    page.locator("section#rule-spam button:text('Restore spam defaults')").click()
    page.wait_for_load_state()
    restored = page.locator("ul.flashes li").all_inner_texts()
    assert len(restored) == 1
    assert restored[0].startswith("The spam rule is back to its defaults: ")
    messages = page.locator("section#rule-spam input[name=spam-messages]")
    assert messages.input_value() == "100"


def test_approve_a_network_lifting_its_block_then_remove_it(page):
    page.goto("/blocks")
    page.fill("input[name=record]", "198.51.100.9")
    page.click("form.record-form button:text('Block')")
    page.wait_for_load_state()
    assert "198.51.100.9" in page.locator("table.log td.ip").all_inner_texts()

    page.click("header nav a:text('Approved list')")
    page.fill("input[name=record]", "198.51.100.0/28")
    page.fill("input[name=note]", "partner relays")
    page.click("form.record-form button:text('Approve')")
    page.wait_for_load_state()
    flashes = page.locator("ul.flashes li").all_inner_texts()
    cells = row_cells(page, "table.approved", "198.51.100.0/28")
    screenshot(page, "approved-list")

    assert flashes == ["198.51.100.0/28 approved (block on 198.51.100.9 lifted)."]
    assert cells[:3] == ["198.51.100.0/28", "", "admin:alice"]
    assert cells[4] == "partner relays"
    assert [b.target for b in service.active_blocks()] == ["198.51.100.78"]

    page.locator("table.approved button:text('Remove')").click()
    page.wait_for_load_state()
    assert page.locator("ul.flashes li").all_inner_texts() == [
        "198.51.100.0/28 no longer approved."
    ]
    assert page.locator("table.approved").count() == 0
    assert service.approved_hosts() == []


def test_overview_shows_the_last_hour(page):
    page.click("header nav a:text('Overview')")
    page.check("input[name=period][value=hour]")
    page.click("button:text('Show')")
    page.wait_for_url("**period=hour**")
    page.wait_for_function("window.Chart !== undefined")
    top_spam = page.locator("section#top-spam td.ip").all_inner_texts()
    counts = {
        name: page.inner_text(f"#count-{name} strong")
        for name in ("blocked", "suspicious")
    }
    chart_width = page.eval_on_selector("#violations-chart", "canvas => canvas.width")
    screenshot(page, "overview")

    # this hour: .77 (suspicious) and .78 (blocked by the changed rule), 3 each
    assert top_spam == ["198.51.100.77", "198.51.100.78"]
    assert page.locator("section#top-virus td.ip").count() == 0
    assert counts == {"blocked": "1", "suspicious": "1"}
    assert chart_width > 0


def test_header_wraps_on_a_narrow_screen(page):
    page.set_viewport_size({"width": 420, "height": 800})
    page.goto(f"/?{MARCH_1}")

    overflow = page.evaluate(
        "() => { const top = document.querySelector('header.top');"
        " return top.scrollWidth - top.clientWidth; }"
    )
    rights = page.eval_on_selector_all(
        "header.top a, header.top button",
        "items => items.map(item => item.getBoundingClientRect().right)",
    )
    screenshot(page, "header-420px")

    assert overflow == 0
    assert len(rights) == 9
    assert max(rights) <= 420
