"""Log-line time stamps: classic syslog (`Dec  4 10:00:00`) and ISO 8601 ones.

Every stamp becomes epoch seconds (UTC). A classic stamp has neither year nor
zone: it is read in the machine's local zone and given the year that puts it
nearest before a reference time (the wall clock unless a test injects one),
allowing up to a day in the future for clocks that disagree a little.

ISO stamps: RFC 3339 as rsyslog writes it (`2026-12-04T10:00:00.123456+00:00`),
`journalctl -o short-iso` (`2026-12-04T10:00:00+0100`), and rspamd's own log
(`2026-12-04 10:00:00`, a space between date and time); without an offset
they are local time.
"""

import calendar
import re
import time
from collections.abc import Callable
from datetime import datetime
from typing import Final

MONTHS: Final = {
    name: number
    for number, name in enumerate(
        ("Jan", "Feb", "Mar", "Apr", "May", "Jun")
        + ("Jul", "Aug", "Sep", "Oct", "Nov", "Dec"),
        start=1,
    )
}
FUTURE_SLACK: Final = 86400.0
EARLIEST: Final = 946684800.0  # 2000-01-01T00:00:00Z
CACHE_LIMIT: Final = 4096

CLASSIC: Final = re.compile(
    r"(([A-Z][a-z]{2}) {1,2}(\d{1,2}) (\d\d)):(\d\d):(\d\d)(\.\d+)?"
)


class StampReader:
    """Reads the time stamp at the start of a log line.

    Consecutive lines often share a stamp: the last one of each style is kept
    with its value, so a repeated stamp is compared, not parsed again. The
    very last one read is kept with the space after it too, so most lines cost
    one `startswith`.
    """

    def __init__(self, now: Callable[[], float] = time.time) -> None:
        self.now = now
        self.hour_starts: dict[tuple[str, int], tuple[float, ...]] = {}
        self.year_span = (0.0, -1.0, 0)
        self.last_classic = ("", 0.0)
        self.last_iso = ("", 0.0)
        # until a stamp is read: no stamp starts with NUL, so None is right
        self.last_prefix = "\0"
        self.last_found: tuple[float, int] | None = None

    def read(self, line: str) -> tuple[float, int] | None:
        """(epoch seconds, index where the rest of the line starts), or None."""
        if line.startswith(self.last_prefix):
            return self.last_found
        if not line:
            return None
        if line[0].isdigit():
            return self._read_rfc3339(line)
        return self._read_classic(line)

    def _read_rfc3339(self, line: str) -> tuple[float, int] | None:
        """An ISO 8601 date and time; naive ones are local time."""
        end = line.find(" ")
        if end == 10 and line[11:13].isdigit() and line[13:14] == ":":
            end = line.find(" ", 11)
        if end < 0:
            end = len(line)
        text = line[:end]
        if text == self.last_iso[0]:
            return self._found(text, self.last_iso[1], end + 1)
        if len(text) < 19 or text[10] not in "Tt ":
            return None
        try:
            stamp = datetime.fromisoformat(text)
            if stamp.tzinfo is None:
                seconds = time.mktime(stamp.timetuple()) + stamp.microsecond / 1e6
            else:
                seconds = stamp.timestamp()
        except (ValueError, OverflowError, OSError):
            return None
        # a stamp years away is damage, not mail: it would hold a block or an
        # entry there (the same bounds as events, docs/events.md)
        if not EARLIEST <= seconds <= self.now() + FUTURE_SLACK:
            return None
        self.last_iso = (text, seconds)
        return self._found(text, seconds, end + 1)

    def _read_classic(self, line: str) -> tuple[float, int] | None:
        """A year-less `Mmm dd HH:MM:SS` stamp in the machine's local zone."""
        text = line[:15]
        if text == self.last_classic[0] and line[15:16] == " ":
            return self._found(text, self.last_classic[1], 16)
        match = CLASSIC.match(line)
        if match is None:
            return None
        minute, second = int(match[5]), int(match[6])
        if minute > 59 or second > 60:
            return None
        offset = minute * 60 + second + (float(match[7]) if match[7] else 0.0)

        reference = self.now()
        for hour_start in self._hour_starts(match, reference):
            if hour_start + offset <= reference + FUTURE_SLACK:
                if match.end() != 15:
                    return hour_start + offset, match.end() + 1
                self.last_classic = (text, hour_start + offset)
                return self._found(text, hour_start + offset, 16)
        return None

    def _found(self, text: str, seconds: float, start: int) -> tuple[float, int]:
        """Remember a stamp read: a line starting with it and a space reads the same."""
        self.last_prefix = text + " "
        found = (seconds, start)
        self.last_found = found
        return found

    def _hour_starts(self, match: re.Match[str], reference: float) -> tuple[float, ...]:
        """Epoch starts of a stamp's hour in each candidate year, latest first.

        Candidates are next year (a stamp just past New Year) and back eight
        years, skipping years without that date (29 February); cached.
        """
        start, end, year = self.year_span
        if not start <= reference < end:
            year = time.localtime(reference).tm_year
            start = time.mktime((year, 1, 1, 0, 0, 0, 0, 0, -1))
            end = time.mktime((year + 1, 1, 1, 0, 0, 0, 0, 0, -1))
            self.year_span = (start, end, year)
        key = (match[1], year)
        cached = self.hour_starts.get(key)
        if cached is not None:
            return cached

        month = MONTHS.get(match[2])
        day, hour = int(match[3]), int(match[4])
        starts: tuple[float, ...] = ()
        # Limitation: in the hour repeated when daylight saving time ends, every
        # stamp gets the offset mktime picks; the stamp alone cannot tell.
        if month is not None and day >= 1 and hour <= 23:
            starts = tuple(
                time.mktime((candidate, month, day, hour, 0, 0, 0, 0, -1))
                for candidate in range(year + 1, year - 8, -1)
                if day <= calendar.monthrange(candidate, month)[1]
            )
        if len(self.hour_starts) >= CACHE_LIMIT:
            self.hour_starts.clear()
        self.hour_starts[key] = starts
        return starts


def parse_stamp(text: str, reference: float | None = None) -> float | None:
    """Epoch seconds of a stamp at the start of `text`, or None if there is none."""
    if reference is None:
        reader = StampReader()
    else:
        at = reference
        reader = StampReader(now=lambda: at)
    found = reader.read(text)
    return None if found is None else found[0]
