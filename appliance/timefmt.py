"""Durations and time stamps as administrators type and read them."""

import re
from datetime import UTC
from datetime import datetime

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
DURATION = re.compile(r"^\s*(\d{1,7})\s*([smhdw]?)\s*$", re.IGNORECASE)


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
