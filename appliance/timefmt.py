"""Durations and time stamps as administrators type and read them."""

import re
from datetime import UTC
from datetime import datetime
from datetime import timedelta

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
# ASCII digits only: \d alone would take ٣٠ (Arabic-Indic) or ３０ (full-width)
DURATION = re.compile(r"^\s*(\d{1,7})\s*([smhdw]?)\s*$", re.IGNORECASE | re.ASCII)
# an ISO 8601 date, optionally with a time to the minute or second and an offset
DATE_TIME = re.compile(
    r"^\d{4}-\d{2}-\d{2}"
    r"(?:[T ](?P<minute>\d{2}:\d{2})(?P<second>:\d{2}(?:\.\d{1,6})?)?)?"
    r"(?:Z|[+-]\d{2}:?\d{2})?$",
    re.IGNORECASE | re.ASCII,
)


def parse_duration(text):
    """Seconds in `90s`, `30m`, `1h`, `2d`, `1w` (a bare number is seconds)."""
    match = DURATION.match(text or "")
    if not match:
        raise ValueError(f"{text!r} is not a duration such as 30m, 1h or 2d")
    return int(match.group(1)) * UNITS[(match.group(2) or "s").lower()]


def format_duration(seconds):
    """The shortest exact way to write a duration: 90s, 30m, 1h, 2d."""
    if seconds is None:
        return "permanent"
    for unit in ("w", "d", "h", "m"):
        if seconds and seconds % UNITS[unit] == 0:
            return f"{seconds // UNITS[unit]}{unit}"
    return f"{seconds}s"


def iso(ts):
    """An epoch time as ISO 8601 in UTC, to the second; '' for None."""
    if ts is None:
        return ""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def parse_time(text):
    """An ISO date or date-time as (epoch start, seconds it spans).

    Read as UTC unless it carries an offset. The span is the precision the
    text names: a day, a minute or a second, so 'to 10:00' covers 10:00:59.
    """
    text = text.strip()
    match = DATE_TIME.match(text)
    try:
        moment = datetime.fromisoformat(text) if match else None
    except ValueError:
        moment = None
    if moment is None:
        raise ValueError(f"{text!r} is not a date-time such as 2026-12-04T10:00")
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    if match.group("second"):
        span = timedelta(seconds=1)
    elif match.group("minute"):
        span = timedelta(minutes=1)
    else:
        span = timedelta(days=1)
    return moment.timestamp(), span.total_seconds()


def date_range(since, until):
    """Epoch bounds of a typed 'from' and 'to': (since_ts, until_ts, {arg: message}).

    An empty text gives None. 'to' reaches the end of the span its text names
    (the whole day of a date, the whole minute of 10:00). Messages are keyed
    by the URL args, 'from' and 'to'.
    """
    bounds = {}
    errors = {}
    for arg, text in (("from", since), ("to", until)):
        if not text:
            continue
        try:
            start, span = parse_time(text)
        except ValueError as exc:
            errors[arg] = str(exc)
            continue
        bounds[arg] = start if arg == "from" else start + span

    since_ts, until_ts = bounds.get("from"), bounds.get("to")
    if since_ts is not None and until_ts is not None and since_ts >= until_ts:
        errors["to"] = "the 'to' date-time is before the 'from' date-time"
    return since_ts, until_ts, errors
