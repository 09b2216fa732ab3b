"""Log-line time stamps: classic syslog (`Dec  4 10:00:00`) and RFC 3339.

Every stamp becomes epoch seconds (UTC). A classic stamp has neither year nor
zone: it is read in the machine's local zone and given the year that puts it
nearest before a reference time (the wall clock unless a test injects one),
allowing up to a day in the future for clocks that disagree a little.
"""

import calendar
import re
import time
from datetime import datetime

MONTHS = {
    name: number
    for number, name in enumerate(
        ("Jan", "Feb", "Mar", "Apr", "May", "Jun")
        + ("Jul", "Aug", "Sep", "Oct", "Nov", "Dec"),
        start=1,
    )
}
FUTURE_SLACK = 86400.0
CACHE_LIMIT = 4096

CLASSIC = re.compile(r"([A-Z][a-z]{2}) {1,2}(\d{1,2}) (\d\d):(\d\d):(\d\d)(\.\d+)?")


class StampReader:
    """Reads the time stamp at the start of a log line."""

    def __init__(self, now=time.time):
        self.now = now
        self.hour_starts = {}
        self.year_span = (0.0, -1.0, 0)

    def read(self, line):
        """(epoch seconds, index where the rest of the line starts), or None."""
        if not line:
            return None
        if line[0].isdigit():
            return self._read_rfc3339(line)
        return self._read_classic(line)

    def _read_rfc3339(self, line):
        """An RFC 3339 stamp up to the first space; naive ones are local time."""
        end = line.find(" ")
        if end < 0:
            end = len(line)
        text = line[:end]
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
        return seconds, end + 1

    def _read_classic(self, line):
        """A year-less `Mmm dd HH:MM:SS` stamp in the machine's local zone."""
        match = CLASSIC.match(line)
        if match is None:
            return None
        month = MONTHS.get(match[1])
        day, hour, minute, second = (int(part) for part in match.group(2, 3, 4, 5))
        if month is None or day < 1 or hour > 23 or minute > 59 or second > 60:
            return None
        offset = minute * 60 + second + (float(match[6]) if match[6] else 0.0)

        reference = self.now()
        for year in self._candidate_years(reference):
            if day > calendar.monthrange(year, month)[1]:
                continue
            seconds = self._hour_start(year, month, day, hour) + offset
            if seconds <= reference + FUTURE_SLACK:
                return seconds, match.end() + 1
        return None

    def _candidate_years(self, reference):
        """Next year first (for a stamp just past New Year), then back eight years."""
        start, end, year = self.year_span
        if not start <= reference < end:
            year = time.localtime(reference).tm_year
            start = time.mktime((year, 1, 1, 0, 0, 0, 0, 0, -1))
            end = time.mktime((year + 1, 1, 1, 0, 0, 0, 0, 0, -1))
            self.year_span = (start, end, year)
        return range(year + 1, year - 8, -1)

    def _hour_start(self, year, month, day, hour):
        """Epoch seconds of a local hour's start, cached."""
        key = (year, month, day, hour)
        seconds = self.hour_starts.get(key)
        if seconds is None:
            if len(self.hour_starts) >= CACHE_LIMIT:
                self.hour_starts.clear()
            seconds = time.mktime((year, month, day, hour, 0, 0, 0, 0, -1))
            self.hour_starts[key] = seconds
        return seconds


def parse_stamp(text, reference=None):
    """Epoch seconds of a stamp at the start of `text`, or None if there is none."""
    if reference is None:
        reader = StampReader()
    else:
        reader = StampReader(now=lambda: reference)
    found = reader.read(text)
    return None if found is None else found[0]
