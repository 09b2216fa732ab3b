"""Log-line time stamps: classic syslog, RFC 3339, journalctl and rspamd forms."""

import time
from datetime import datetime

import pytest
from annotated import pin_zone
from annotated import read_as_utc

from appliance.sources.timestamps import parse_stamp

NOW = datetime.fromisoformat("2026-12-04T12:00:00+00:00").timestamp()


@pytest.fixture(autouse=True)
def utc(monkeypatch):
    """Classic stamps are local time: read them as UTC in these tests."""
    yield from read_as_utc(monkeypatch)


@pytest.mark.parametrize(
    ("stamp", "reference", "expected"),
    [
        ("Dec  4 10:00:00", NOW, "2026-12-04T10:00:00+00:00"),
        ("Mar 7 02:09:33", NOW, "2026-03-07T02:09:33+00:00"),
        ("Jun 04 22:24:28", NOW, "2026-06-04T22:24:28+00:00"),
        ("Dec 04 10:00:00", NOW, "2026-12-04T10:00:00+00:00"),
        ("Dec  5 11:59:59", NOW, "2026-12-05T11:59:59+00:00"),
        ("Dec  5 12:00:01", NOW, "2025-12-05T12:00:01+00:00"),
        ("Dec 31 23:59:59", "2027-01-01T00:10:00+00:00", "2026-12-31T23:59:59+00:00"),
        ("Jan  1 00:00:05", "2026-12-31T23:59:00+00:00", "2027-01-01T00:00:05+00:00"),
        ("Feb 29 12:00:00", "2027-03-01T00:00:00+00:00", "2024-02-29T12:00:00+00:00"),
        ("Dec  4 10:00:00.250", NOW, "2026-12-04T10:00:00.25+00:00"),
        ("2026-12-04T10:00:00.123456+00:00", NOW, "2026-12-04T10:00:00.123456+00:00"),
        ("2026-12-04T11:00:00.5+01:00", NOW, "2026-12-04T10:00:00.5+00:00"),
        ("2026-12-04T10:00:00Z", NOW, "2026-12-04T10:00:00+00:00"),
        ("2020-01-01T00:00:00+00:00", NOW, "2020-01-01T00:00:00+00:00"),
        ("2026-12-04T11:00:00+0100", NOW, "2026-12-04T10:00:00+00:00"),
        ("2026-12-04T04:00:00.000250-0600", NOW, "2026-12-04T10:00:00.00025+00:00"),
        ("2026-12-04 10:00:00", NOW, "2026-12-04T10:00:00+00:00"),
        ("2026-12-04 10:00:00.125", NOW, "2026-12-04T10:00:00.125+00:00"),
        ("2026-12-05T12:00:00+00:00", NOW, "2026-12-05T12:00:00+00:00"),
        ("2000-01-01T00:00:00Z", NOW, "2000-01-01T00:00:00+00:00"),
    ],
)
def test_stamp_is_read_as_utc_epoch_seconds(stamp, reference, expected):
    if isinstance(reference, str):
        reference = datetime.fromisoformat(reference).timestamp()

    found = parse_stamp(stamp + " mx1 postfix/smtpd[1]: x", reference=reference)

    assert found == datetime.fromisoformat(expected).timestamp()


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Foo  4 10:00:00 mx1",
        "Dec 32 10:00:00 mx1",
        "Dec  0 10:00:00 mx1",
        "Dec  4 24:00:00 mx1",
        "Feb 30 10:00:00 mx1",
        "2026-13-01T00:00:00+00:00 mx1",
        "2026-12-04 mx1",
        "2026-12-04 25:00:00 #1(normal)",
        "2026-12-04 10:00 #1(normal)",
        "12345",
        "dec  4 10:00:00 mx1",
    ],
)
def test_text_without_a_stamp_gives_none(text):
    assert parse_stamp(text, reference=NOW) is None


@pytest.mark.parametrize(
    "stamp",
    [
        "2026-12-05T12:00:01+00:00",
        "2099-06-01T00:00:00+00:00",
        "9999-12-31T23:59:59-14:00",
        "1999-12-31T23:59:59+00:00",
        "0001-01-01T00:00:00+14:00",
        "2099-06-01 00:00:00",
    ],
)
def test_stamp_over_a_day_ahead_or_before_2000_is_not_read(stamp):
    # read, it would hold a block or an entry in that year
    assert parse_stamp(stamp + " mx1 postfix/smtpd[1]: x", reference=NOW) is None


def test_classic_stamp_is_local_time(monkeypatch):
    pin_zone(monkeypatch, "XST-1")

    found = parse_stamp("Dec  4 10:00:00 mx1", reference=NOW)

    assert found == datetime.fromisoformat("2026-12-04T09:00:00+00:00").timestamp()


def test_rspamd_stamp_is_local_time(monkeypatch):
    pin_zone(monkeypatch, "XST-1")

    found = parse_stamp("2026-12-04 10:00:00 #1234(normal) <a1>; task; x")

    assert found == datetime.fromisoformat("2026-12-04T09:00:00+00:00").timestamp()


def test_stamp_with_an_offset_ignores_the_local_zone(monkeypatch):
    pin_zone(monkeypatch, "XST-1")

    found = parse_stamp("2026-12-04T10:00:00+0000 mx1 postfix/smtpd[1]: x")

    assert found == datetime.fromisoformat("2026-12-04T10:00:00+00:00").timestamp()


def test_default_reference_is_the_wall_clock():
    stamp = time.strftime("%b %d %H:%M:%S", time.localtime(time.time() - 60))

    found = parse_stamp(stamp)

    assert abs(found - (time.time() - 60)) < 5
