"""The Overview page: top IPs per type, counts, the chart and its vendored library."""

import json
import re
import time
from dataclasses import replace

import pytest
from test_web import add_entry
from test_web import args_of
from test_web import links
from test_web import make_app
from test_web import page_text
from web_session import logged_in

from appliance import service
from appliance.overview import overview
from appliance.timefmt import parse_duration
from web.overview import CACHE_SECONDS

HOUR = 3600
# a fixed "now" on a whole UTC hour, for the exact chart checks
NOW = 1_779_998_400.0


@pytest.fixture
def client(settings):
    """A logged-in client of the console, CSRF checks off."""
    return logged_in(make_app(settings, WTF_CSRF_ENABLED=False))


def top_table(response, threat_type):
    """(IP, violations) rows of one type's top table, top to bottom."""
    text = page_text(response)
    section = text.split(f'id="top-{threat_type}"')[1].split("</section>")[0]
    rows = re.findall(
        r'<td class="ip"><a [^>]*>([^<]*)</a></td>\s*<td class="num">(\d+)</td>',
        section,
    )
    return [(ip, int(violations)) for ip, violations in rows]


def chart_data(response):
    """The chart's labels and series, as the page hands them to the script."""
    found = re.search(
        r'<script type="application/json" id="chart-data">(.*?)</script>',
        page_text(response),
        re.S,
    )
    return json.loads(found[1])


def count(response, name):
    """The figure in one of the count boxes."""
    box = page_text(response).split(f'id="count-{name}"')[1]
    return int(re.search(r"<strong>(\d+)</strong>", box)[1])


def test_top_ips_add_up_episodes_per_sender_within_the_period(client):
    now = time.time()
    add_entry("192.0.2.1", "spam", now - 600, violations=30, messages=40)
    add_entry("192.0.2.1", "spam", now - 5 * HOUR, violations=25, messages=30)
    add_entry("192.0.2.2", "spam", now - 60, violations=40, messages=41)
    add_entry("192.0.2.3", "spam", now - 2 * 86400, violations=500, messages=900)
    add_entry("192.0.2.4", "virus", now - 120, violations=7, messages=7)
    add_entry("2001:db8:1:2::/64", "dha", now - 300, violations=12, messages=13)

    day = client.get("/overview?period=day")
    hour = client.get("/overview?period=hour")
    week = client.get("/overview?period=week")

    assert day.status_code == 200
    assert top_table(day, "spam") == [("192.0.2.1", 55), ("192.0.2.2", 40)]
    assert top_table(hour, "spam") == [("192.0.2.2", 40), ("192.0.2.1", 30)]
    assert top_table(week, "spam")[0] == ("192.0.2.3", 500)
    assert top_table(day, "virus") == [("192.0.2.4", 7)]
    assert top_table(day, "dha") == [("2001:db8:1:2::/64", 12)]
    assert top_table(day, "bounce") == []
    assert "No bounce violations in the period." in page_text(day)


def test_top_list_holds_ten_senders_and_links_to_the_log(client):
    now = time.time()
    for n in range(12):
        add_entry(f"198.51.100.{n + 1}", "dha", now - 60, violations=n + 1)

    response = client.get("/overview?period=hour")

    shown = top_table(response, "dha")
    assert [ip for ip, _ in shown] == [f"198.51.100.{n}" for n in range(12, 2, -1)]
    top_links = [u for u in links(response) if "ip=" in u]
    assert args_of(top_links[0]) == {"ip": ["198.51.100.12"], "type": ["dha"]}


def test_counts_of_blocked_and_suspicious_ips(client):
    now = time.time()
    add_entry("192.0.2.1", "spam", now - 60)
    add_entry("192.0.2.1", "virus", now - 60)
    add_entry("192.0.2.2", "spam", now - 60)
    add_entry("192.0.2.9", "spam", now - 3 * 86400)
    add_entry("203.0.113.5", "spam", now - 60)
    service.block("203.0.113.5", duration=HOUR, actor="test")
    service.block("198.51.100.0/24", duration=None, actor="test")
    lifted = service.block("203.0.113.77", duration=HOUR, actor="test")
    service.unblock(lifted.target, actor="test")

    response = client.get("/overview")

    assert count(response, "blocked") == 2
    assert "1 permanent" in page_text(response)
    assert count(response, "suspicious") == 2
    assert count(client.get("/overview?period=week"), "suspicious") == 3


def test_chart_counts_violations_per_bucket_and_type(settings):
    add_entry("192.0.2.1", "spam", NOW - 10, violations=4)
    add_entry("192.0.2.2", "spam", NOW - 30 * 60, violations=6)
    add_entry("192.0.2.3", "spam", NOW - 35 * 60, violations=1)
    add_entry("192.0.2.4", "virus", NOW - 59 * 60, violations=2)
    add_entry("192.0.2.5", "virus", NOW - 61 * 60, violations=100)

    figures = overview("hour", now=NOW)

    assert figures.bucket_seconds == parse_duration("5m")
    assert figures.bucket_starts == [NOW - HOUR + n * 300 for n in range(12)]
    assert figures.series["spam"] == [0] * 5 + [1, 6] + [0] * 4 + [4]
    assert figures.series["virus"] == [2] + [0] * 11
    assert figures.series["dha"] == [0] * 12


def test_chart_buckets_start_on_whole_hours_for_the_day(settings):
    now = NOW + 20 * 60
    add_entry("192.0.2.1", "dha", now - 24 * HOUR + 60, violations=3)
    add_entry("192.0.2.2", "dha", now - 24 * HOUR - 60, violations=50)
    add_entry("192.0.2.3", "dha", now - 60, violations=5)

    figures = overview("day", now=now)

    assert len(figures.bucket_starts) == 25
    assert all(start % HOUR == 0 for start in figures.bucket_starts)
    assert figures.bucket_starts[0] == NOW - 24 * HOUR
    assert figures.series["dha"] == [3] + [0] * 23 + [5]


@pytest.mark.parametrize(
    ("period", "buckets"), [("hour", 12), ("day", 24), ("week", 28)]
)
def test_page_hands_the_chart_its_data(client, period, buckets):
    add_entry("192.0.2.1", "bounce", time.time() - 30, violations=9)

    data = chart_data(client.get(f"/overview?period={period}"))

    # one more bucket unless now falls on a bucket boundary
    assert len(data["labels"]) in (buckets, buckets + 1)
    series = dict(data["series"])
    assert [name for name, _ in data["series"]] == ["spam", "virus", "dha", "bounce"]
    assert all(len(values) == len(data["labels"]) for values in series.values())
    # 30 s ago is in the last bucket, or the one before when one just began
    assert sum(series["bounce"][-2:]) == sum(series["bounce"]) == 9


def test_hostile_sender_text_stays_inert_in_the_top_list(client):
    entry = add_entry("192.0.2.1", "spam", time.time() - 30)
    entry.sender = "</script><script>alert(1)</script>"
    entry.save()

    text = page_text(client.get("/overview"))

    assert "<script>alert(1)" not in text
    assert "&lt;/script&gt;&lt;script&gt;alert(1)" in text


def test_unknown_period_gets_a_message_and_the_day(client):
    response = client.get("/overview?period=fortnight")

    assert response.status_code == 200
    assert "&#39;fortnight&#39; is not a period; choose hour, day or week" in (
        page_text(response)
    )
    assert re.search(r'value="day"\s+checked', page_text(response))


def test_chart_library_is_served_from_the_appliance(client):
    page = page_text(client.get("/overview"))
    library = client.get("/static/vendor/chart.js/chart.umd.min.js")
    drawing = client.get("/static/overview.js")

    scripts = re.findall(r'<script src="([^"]+)"', page)
    assert scripts == [
        "/static/vendor/chart.js/chart.umd.min.js",
        "/static/overview.js",
    ]
    assert library.status_code == 200
    assert b"Chart.js v4.5.1" in library.data[:200]
    assert drawing.status_code == 200 and b"new Chart(" in drawing.data
    library.close()
    drawing.close()


def test_overview_is_first_in_the_navigation(client):
    nav = page_text(client.get("/blocks")).split("<nav>")[1].split("</nav>")[0]

    assert re.findall(r">([^<]+)</a>", nav)[:2] == ["Overview", "Suspicious IP log"]


def test_old_figures_are_shown_while_new_ones_are_worked_out(settings):
    app = make_app(settings, WTF_CSRF_ENABLED=False)
    client = logged_in(app)
    add_entry("192.0.2.1", "spam", time.time() - 60)
    first = count(client.get("/overview?period=week"), "suspicious")
    add_entry("192.0.2.2", "spam", time.time() - 60)

    reused = count(client.get("/overview?period=week"), "suspicious")
    cache = app.extensions["overview_cache"]
    aged = replace(cache.figures["week"], now=time.time() - CACHE_SECONDS["week"] - 1)
    cache.figures["week"] = aged
    while_refreshing = count(client.get("/overview?period=week"), "suspicious")
    worker = cache.refreshing.get("week")
    if worker is not None:
        worker.join(timeout=10)
    refreshed = client.get("/overview?period=week")

    assert (first, reused, while_refreshing) == (1, 1, 1)
    assert count(refreshed, "suspicious") == 2
    assert cache.refreshing == {}
    assert "figures older than 5m are worked out again" in page_text(refreshed)
