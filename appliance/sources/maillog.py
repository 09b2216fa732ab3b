"""One mail-log line read as what it means: a connection, a reject, a verdict.

`parse` never raises. It reads the time stamp, then the syslog host and
program, and hands the rest to that program's reader (`postfix`,
`scanners`); rspamd's own log file (stamp, then `#pid(worker)`) has no host
or program. What a line can mean is in `logline`.
"""

import logging
import re

from appliance.sources import postfix
from appliance.sources import scanners
from appliance.sources.logline import IGNORED_LINE
from appliance.sources.logline import SKIPPED_LINE

log = logging.getLogger(__name__)

HEADER = re.compile(r"\S+ ([^\s\[\]:]+)(?:\[\d{1,10}\])?: ")
AMAVIS_NAMES = ("amavis", "/usr/sbin/amavis")


def parse(line, stamps):
    """Read one line with a timestamps.StampReader; never raises."""
    try:
        return _parse(line, stamps)
    except Exception:  # a parser bug must not stop ingest; the line is skipped
        log.warning("mail-log line not parsed (parser error): %r", line, exc_info=True)
        return SKIPPED_LINE


def _parse(line, stamps):
    """Split off stamp, host and program, then read the program's message."""
    if not line or line.isspace():
        return IGNORED_LINE
    stamp = stamps.read(line)
    if stamp is None:
        return SKIPPED_LINE
    ts, start = stamp
    header = HEADER.match(line, start)
    if header is None:
        if line.startswith("#", start):
            return scanners.read_rspamd(line[start:].rstrip("\r\n"), ts)
        return SKIPPED_LINE
    program = header[1]
    message = line[header.end() :].rstrip("\r\n")

    if program.startswith("postfix"):
        reader = postfix.READERS.get(program[program.rfind("/") + 1 :])
        if reader is None:
            return IGNORED_LINE
        return reader(message, ts, line[header.start(1) : header.end() - 2])
    if program.startswith(AMAVIS_NAMES):
        return scanners.read_amavis(message, ts)
    if program.startswith("rspamd"):
        return scanners.read_rspamd(message, ts)
    if program == "clamav-milter":
        return scanners.read_clamav_milter(message, ts)
    return IGNORED_LINE
