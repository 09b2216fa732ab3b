"""One mail-log line read as what it means: a connection, a reject, a verdict.

`parse` never raises. It reads the time stamp, then the syslog host and
program, and hands the rest to that program's reader (`postfix`,
`scanners`); rspamd's own log file (stamp, then `#pid(worker)`) has no host
or program. What a line can mean is in `logline`.
"""

import logging
import re
from collections.abc import Callable
from typing import Final
from typing import Literal

from appliance.sources import postfix
from appliance.sources import scanners
from appliance.sources.logline import IGNORED_LINE
from appliance.sources.logline import SKIPPED_LINE
from appliance.sources.logline import LogLine
from appliance.sources.timestamps import StampReader

log = logging.getLogger(__name__)

# group 1: the process as `program[pid]`, group 2: the program
HEADER: Final = re.compile(r"\S+ (([^\s\[\]:]+)(?:\[\d{1,10}\])?): ")
AMAVIS_NAMES: Final = ("amavis", "/usr/sbin/amavis")
PROGRAM_CACHE_LIMIT: Final = 1024
Reader = Callable[..., LogLine]
_readers: dict[str, Reader | Literal[False]] = {}


def parse(line: str, stamps: StampReader) -> LogLine:
    """Read one line with a timestamps.StampReader; never raises.

    Splits off stamp, host and program, then has the program's reader read
    the message.
    """
    try:
        # most lines repeat the last stamp: StampReader.read's first test, inline
        if line.startswith(stamps.last_prefix):
            stamp = stamps.last_found
        else:
            stamp = stamps.read(line)
        if stamp is None:
            # a blank line has no stamp: checked only here, where it is rare
            return IGNORED_LINE if not line or line.isspace() else SKIPPED_LINE
        ts, start = stamp
        header = HEADER.match(line, start)
        if header is None:
            if line.startswith("#", start):
                return scanners.read_rspamd(line[start:].rstrip("\r\n"), ts)
            return SKIPPED_LINE

        program = header[2]
        reader = _readers.get(program)
        if reader is None:
            reader = _reader_of(program)
        if reader is False:
            return IGNORED_LINE
        message = line[header.end() :].rstrip("\r\n")
        if program.startswith("postfix"):
            return reader(message, ts, header[1])
        return reader(message, ts)
    except Exception:  # a parser bug must not stop ingest; the line is skipped
        log.warning("mail-log line not parsed (parser error): %r", line, exc_info=True)
        return SKIPPED_LINE


def _reader_of(program: str) -> Reader | Literal[False]:
    """The reader of a program's lines, or False when its lines carry nothing."""
    if program.startswith("postfix"):
        reader: Reader | Literal[False] = postfix.READERS.get(
            program[program.rfind("/") + 1 :], False
        )
    elif program.startswith(AMAVIS_NAMES):
        reader = scanners.read_amavis
    elif program.startswith("rspamd"):
        reader = scanners.read_rspamd
    elif program == "clamav-milter":
        reader = scanners.read_clamav_milter
    else:
        reader = False
    if len(_readers) >= PROGRAM_CACHE_LIMIT:
        _readers.clear()
    _readers[program] = reader
    return reader
