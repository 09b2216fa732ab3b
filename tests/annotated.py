"""Annotated sample files (tests/samples/*.txt): reading them and what they expect.

A sample file is read line by line:

- `#` starts a comment; `#! now=RFC3339` sets the reference time for
  year-less stamps in the lines below it;
- `--- title` starts a scenario: the lines after it go to a fresh correlator;
- any other non-blank line is a log line, fed after the scenario's earlier
  lines, and must be followed by one or more `=>` lines saying what it gives:
  `=> none`, `=> skipped`, or one `=> ip=ADDR message=N violations=a,b
  recipients=N unknown=N [ts=RFC3339]` per event, in order (omitted fields are
  0 or empty; without ts= the line's own stamp is expected).
"""

import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from appliance.events import MailEvent
from appliance.sources.timestamps import StampReader

SAMPLES = Path(__file__).resolve().parent / "samples"
DEFAULT_NOW = datetime.fromisoformat("2026-12-05T00:00:00+00:00").timestamp()


@dataclass
class Sample:
    """One annotated log line and the scenario lines fed before it."""

    where: str
    line: str
    history: tuple
    now: float
    expected: list


def read_samples(path):
    """Every annotated log line of one sample file."""
    samples = []
    history = []
    now = DEFAULT_NOW
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        where = f"{path.name}:{number}"
        if text.startswith("=>"):
            if not samples:
                raise ValueError(f"{where}: '=>' without a log line before it")
            samples[-1].expected.append(text[2:].strip())
            continue
        if samples and not samples[-1].expected:
            raise ValueError(f"{samples[-1].where}: log line without '=>' after it")

        if not text.strip() or (text.startswith("#") and not text.startswith("#!")):
            continue
        if text.startswith("#!"):
            key, _, value = text[2:].strip().partition("=")
            if key != "now":
                raise ValueError(f"{where}: unknown directive {key!r}")
            now = datetime.fromisoformat(value).timestamp()
        elif text.startswith("---"):
            history = []
        else:
            samples.append(Sample(where, text, tuple(history), now, []))
            history.append(text)
    if samples and not samples[-1].expected:
        raise ValueError(f"{samples[-1].where}: log line without '=>' after it")
    return samples


def all_samples():
    """Annotated lines of every sample file, in file order."""
    return [s for path in sorted(SAMPLES.glob("*.txt")) for s in read_samples(path)]


def expected_events(sample):
    """The MailEvents a sample's `=>` lines describe.

    An event with violations carries the sample's own line as its evidence.
    """
    own_ts = StampReader(now=lambda: sample.now).read(sample.line)
    events = []
    for text in sample.expected:
        if text in ("none", "skipped"):
            continue
        fields = dict(word.split("=", 1) for word in text.split())
        ts = fields.pop("ts", None)
        violations = tuple(filter(None, fields.pop("violations", "").split(",")))
        events.append(
            MailEvent(
                ts=datetime.fromisoformat(ts).timestamp() if ts else own_ts[0],
                ip=fields.pop("ip"),
                message=int(fields.pop("message", 0)),
                violations=violations,
                recipients=int(fields.pop("recipients", 0)),
                unknown=int(fields.pop("unknown", 0)),
                line=sample.line if violations else None,
            )
        )
        assert not fields, f"{sample.where}: unknown fields {fields}"
    return events


def pin_zone(monkeypatch, zone):
    """Make the process's local time zone `zone` (a POSIX TZ string)."""
    monkeypatch.setenv("TZ", zone)
    time.tzset()


def read_as_utc(monkeypatch):
    """Read local-time stamps as UTC until the test ends (a fixture's body)."""
    pin_zone(monkeypatch, "UTC")
    yield
    monkeypatch.undo()
    time.tzset()
