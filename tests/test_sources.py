"""Mail-log sources: annotated sample lines, the public corpus, robustness, state.

Sample files (tests/samples/*.txt) are read line by line:

- `#` starts a comment; `#! now=RFC3339` sets the reference time for
  year-less stamps in the lines below it;
- `--- title` starts a scenario: the lines after it go to a fresh correlator;
- any other non-blank line is a log line, fed after the scenario's earlier
  lines, and must be followed by one or more `=>` lines saying what it gives:
  `=> none`, `=> skipped`, or one `=> ip=ADDR message=N violations=a,b
  recipients=N unknown=N [ts=RFC3339]` per event, in order (omitted fields are
  0 or empty; without ts= the line's own stamp is expected).
"""

import ipaddress
import json
import random
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest

from appliance.config import THREAT_TYPES
from appliance.events import MailEvent
from appliance.sources.correlate import Correlator
from appliance.sources.timestamps import StampReader
from appliance.sources.timestamps import parse_stamp

try:
    from tests.conftest import CORPUS
    from tests.conftest import require
except ImportError:  # tests/ is not a package: pytest put tests/ on sys.path
    from conftest import CORPUS
    from conftest import require

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
    """The MailEvents a sample's `=>` lines describe."""
    own_ts = StampReader(now=lambda: sample.now).read(sample.line)
    events = []
    for text in sample.expected:
        if text in ("none", "skipped"):
            continue
        fields = dict(word.split("=", 1) for word in text.split())
        ts = fields.pop("ts", None)
        events.append(
            MailEvent(
                ts=datetime.fromisoformat(ts).timestamp() if ts else own_ts[0],
                ip=fields.pop("ip"),
                message=int(fields.pop("message", 0)),
                violations=tuple(filter(None, fields.pop("violations", "").split(","))),
                recipients=int(fields.pop("recipients", 0)),
                unknown=int(fields.pop("unknown", 0)),
            )
        )
        assert not fields, f"{sample.where}: unknown fields {fields}"
    return events


def pin_zone(monkeypatch, zone):
    """Make the process's local time zone `zone` (a POSIX TZ string)."""
    monkeypatch.setenv("TZ", zone)
    time.tzset()


@pytest.fixture(autouse=True)
def utc(monkeypatch):
    """Classic stamps are local time: read them as UTC in these tests."""
    pin_zone(monkeypatch, "UTC")
    yield
    monkeypatch.undo()
    time.tzset()


SAMPLE_LINES = all_samples()


@pytest.mark.parametrize("sample", SAMPLE_LINES, ids=[s.where for s in SAMPLE_LINES])
def test_sample_line_gives_its_events(sample):
    correlator = Correlator(now=lambda: sample.now)
    for earlier in sample.history:
        correlator.feed(earlier)
    skipped_before = correlator.skipped

    events = correlator.feed(sample.line + "\n")

    assert events == expected_events(sample)
    assert (correlator.skipped - skipped_before == 1) == ("skipped" in sample.expected)


def test_samples_cover_every_threat_type_and_both_stamp_styles():
    events = [e for s in SAMPLE_LINES for e in expected_events(s)]

    assert {v for e in events for v in e.violations} == set(THREAT_TYPES)
    assert any(s.line[:1].isdigit() for s in SAMPLE_LINES)
    assert any(s.line[:1].isalpha() for s in SAMPLE_LINES)
    assert any(":" in e.ip for e in events)


# --- time stamps -------------------------------------------------------------

NOW = datetime.fromisoformat("2026-12-04T12:00:00+00:00").timestamp()


@pytest.mark.parametrize(
    ("stamp", "reference", "expected"),
    [
        ("Dec  4 10:00:00", NOW, "2026-12-04T10:00:00+00:00"),
        ("Mar 7 02:09:33", NOW, "2026-03-07T02:09:33+00:00"),
        ("Jun 04 22:24:28", NOW, "2026-06-04T22:24:28+00:00"),
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
        "12345",
        "dec  4 10:00:00 mx1",
    ],
)
def test_text_without_a_stamp_gives_none(text):
    assert parse_stamp(text, reference=NOW) is None


def test_classic_stamp_is_local_time(monkeypatch):
    pin_zone(monkeypatch, "XST-1")

    found = parse_stamp("Dec  4 10:00:00 mx1", reference=NOW)

    assert found == datetime.fromisoformat("2026-12-04T09:00:00+00:00").timestamp()


def test_default_reference_is_the_wall_clock():
    stamp = time.strftime("%b %d %H:%M:%S", time.localtime(time.time() - 60))

    found = parse_stamp(stamp)

    assert abs(found - (time.time() - 60)) < 5


# --- the public corpus -------------------------------------------------------


def corpus_files():
    """The public corpus logs; skipped (failed under CI) when absent."""
    require(CORPUS.is_dir(), f"needs the public corpus in {CORPUS}")
    files = sorted(CORPUS.glob("*.log"))
    require(bool(files), f"no *.log files in {CORPUS}")
    return files


def feed_file(correlator, path):
    """Feed a file's lines as the follower reads them; returns the events."""
    events = []
    with open(path, "rb") as handle:
        for raw in handle:
            events.extend(correlator.feed(raw.decode("utf-8", "replace")))
    return events


def test_corpus_harvesters_are_charged_their_unknown_recipients():
    unknown = {}
    dha = {}

    for path in corpus_files():
        correlator = Correlator(now=lambda: NOW)
        events = feed_file(correlator, path)
        for event in events:
            if event.unknown:
                unknown[event.ip] = unknown.get(event.ip, 0) + event.unknown
            if "dha" in event.violations:
                dha[event.ip] = dha.get(event.ip, 0) + 1

    expected = {"72.53.132.234": 1, "192.0.2.1": 1, "192.0.2.2": 1}
    assert unknown == expected
    assert dha == expected


def test_corpus_log_lines_are_all_understood():
    for path in corpus_files():
        correlator = Correlator(now=lambda: NOW)

        feed_file(correlator, path)

        with open(path, "rb") as handle:
            raw_lines = handle.readlines()
        comments = sum(1 for raw in raw_lines if raw.startswith(b"#"))
        assert correlator.lines == len(raw_lines), path.name
        assert correlator.skipped == comments, path.name


# --- robustness --------------------------------------------------------------

NOISE = "[]<>():;,=@./- \t\x00\x7f\ufffd\u00e9\u2028" + "0123456789ABCDEFabcdef"
TOKENS = (
    "NOQUEUE: ",
    "reject: ",
    "milter-reject: ",
    "client=",
    "from=<>",
    "[",
    "]",
    "[IPv6:",
    "::ffff:",
    "Queue-ID: ",
    "Blocked SPAM ",
    " (queue active)",
    "nrcpt=",
    "RCPT from ",
    "Recipient address rejected: User unknown",
    "99999999999999999999",
)


def mangle(rng, line):
    """A line with one to three random edits: cut, drop, insert, repeat, swap."""
    for _ in range(rng.randint(1, 3)):
        at = rng.randrange(len(line) + 1)
        edit = rng.randrange(7)
        if edit == 0:
            line = line[:at]
        elif edit == 1:
            line = line[:at] + line[at + rng.randint(1, 12) :]
        elif edit == 2:
            noise = "".join(rng.choice(NOISE) for _ in range(rng.randint(1, 6)))
            line = line[:at] + noise + line[at:]
        elif edit == 3:
            line = line[:at] + rng.choice(TOKENS) + line[at:]
        elif edit == 4:
            line = line[:at] + line[at : at + rng.randint(1, 40)] * 2 + line[at:]
        elif edit == 5:
            words = line.split(" ")
            i, j = rng.randrange(len(words)), rng.randrange(len(words))
            words[i], words[j] = words[j], words[i]
            line = " ".join(words)
        else:
            line = bytes(rng.randrange(256) for _ in range(rng.randint(0, 80))).decode(
                "latin-1"
            )
    return line


def test_feed_never_raises_on_mangled_lines():
    rng = random.Random(20261204)
    originals = [s.line for s in SAMPLE_LINES]
    if CORPUS.is_dir():
        for path in sorted(CORPUS.glob("*.log")):
            originals += path.read_text("utf-8", "replace").splitlines()
    correlator = Correlator(now=lambda: NOW)

    for _ in range(20000):
        line = rng.choice(originals)
        if rng.random() < 0.9:
            line = mangle(rng, line)
        for event in correlator.feed(line):
            address = ipaddress.ip_address(event.ip)
            assert not address.is_loopback and str(address) == event.ip
            assert event.message in (0, 1)
            assert set(event.violations) <= set(THREAT_TYPES)
            assert event.recipients >= event.unknown >= 0

    assert correlator.lines == 20000
    assert correlator.skipped > 1000
    Correlator.restore(json.loads(json.dumps(correlator.dump())))


# --- state across restarts ---------------------------------------------------


def test_state_saved_midway_gives_the_same_events_as_one_pass():
    lines = [s.line + "\n" for s in SAMPLE_LINES]
    whole = Correlator(now=lambda: NOW)
    one_pass = [e for line in lines for e in whole.feed(line)]

    for cut in range(len(lines) + 1):
        first = Correlator(now=lambda: NOW)
        events = [e for line in lines[:cut] for e in first.feed(line)]
        saved = json.dumps(first.dump())
        second = Correlator.restore(json.loads(saved), now=lambda: NOW)
        events += [e for line in lines[cut:] for e in second.feed(line)]

        assert events == one_pass, f"cut before line {cut}"
        assert (second.lines, second.skipped) == (whole.lines, whole.skipped)


def test_restore_of_nothing_is_a_fresh_correlator():
    correlator = Correlator.restore({})

    assert (correlator.lines, correlator.skipped, correlator.queue) == (0, 0, {})


def test_state_forgets_removed_and_stale_queue_ids():
    correlator = Correlator(now=lambda: NOW)
    start = "2026-12-01T10:00:00+00:00 mx1 postfix/"
    correlator.feed(start + "smtpd[1]: 0A0A0A0A0A: client=a.example.net[192.0.2.5]")
    correlator.feed(start + "smtpd[2]: 0B0B0B0B0B: client=b.example.net[192.0.2.6]")
    correlator.feed(
        start
        + "qmgr[9]: 0B0B0B0B0B: from=<a@b.example>, size=1, nrcpt=1 (queue active)"
    )
    correlator.feed(start + "smtpd[3]: 0C0C0C0C0C: client=c.example.net[192.0.2.7]")
    correlator.feed(start + "qmgr[9]: 0C0C0C0C0C: removed")

    assert set(correlator.dump()["queue"]) == {"0A0A0A0A0A", "0B0B0B0B0B"}

    correlator.feed(
        "2026-12-01T12:00:00+00:00 mx1 postfix/smtpd[4]: connect from x[::1]"
    )
    assert set(correlator.dump()["queue"]) == {"0B0B0B0B0B"}

    correlator.feed(
        "2026-12-03T12:00:00+00:00 mx1 postfix/smtpd[4]: connect from x[::1]"
    )
    assert correlator.dump()["queue"] == {}
