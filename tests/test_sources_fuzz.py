"""Robustness: mangled, random and hostile lines never stop the correlator.

Every event it emits is sane: a valid, canonical, chargeable IP, a message
flag of 0 or 1, known threat types each at most once, no negative counts.
"""

import ipaddress
import json
import math
import random
from datetime import datetime

import pytest
from annotated import all_samples
from annotated import read_as_utc
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from appliance.config import THREAT_TYPES
from appliance.sources.correlate import Correlator

try:
    from tests.conftest import CORPUS
except ImportError:  # tests/ is not a package: pytest put tests/ on sys.path
    from conftest import CORPUS

NOW = datetime.fromisoformat("2026-12-04T12:00:00+00:00").timestamp()
NOISE = "[]<>():;,=@./- \t\x00\x7f\ufffd\u00e9\u2028" + "0123456789ABCDEFabcdef"
TOKENS = (
    "NOQUEUE: ",
    "reject: ",
    "milter-reject: ",
    "milter-hold: ",
    "client=",
    "connect from ",
    "disconnect from ",
    " mail=99999 rcpt=0/999999 commands=1/2",
    " mail=3 rcpt=2/7 commands=9/12",
    "from=<>",
    "[",
    "]",
    "[IPv6:",
    "::ffff:",
    "[0.0.0.0]",
    "[fe80::1%eth0]",
    "Queue-ID: ",
    "Blocked SPAM ",
    "Passed BANNED ",
    " (queue active)",
    "nrcpt=",
    "RCPT from ",
    " blocked using ",
    "Recipient address rejected: User unknown",
    "rspamd_task_write_log: ",
    "qid: <4F2A1B3C5D>, ip: 192.0.2.7, ",
    "(default: T (reject): [",
    "CLAM_VIRUS(",
    "Message 4F2A1B3C5D from <a@b> to <c@d> infected by X",
    "#1234(normal) ",
    "99999999999999999999",
)


def originals():
    """Sample lines and, where present, the public corpus's lines."""
    lines = [s.line for s in all_samples()]
    if CORPUS.is_dir():
        for path in sorted(CORPUS.glob("*.log")):
            lines += path.read_text("utf-8", "replace").splitlines()
    return lines


ORIGINALS = originals()


@pytest.fixture(autouse=True)
def utc(monkeypatch):
    """Classic stamps are local time: read them as UTC in these tests."""
    yield from read_as_utc(monkeypatch)


def assert_sane(event):
    """An event the profiler can count without a second look."""
    address = ipaddress.ip_address(event.ip)
    assert str(address) == event.ip
    assert not (address.is_loopback or address.is_unspecified)
    assert not (address.version == 6 and address.ipv4_mapped)
    assert math.isfinite(event.ts)
    assert event.message in (0, 1)
    assert set(event.violations) <= set(THREAT_TYPES)
    assert len(set(event.violations)) == len(event.violations)
    assert event.recipients >= event.unknown >= 0
    assert event.message or event.violations or event.recipients


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
    correlator = Correlator(now=lambda: NOW)

    for _ in range(20000):
        line = rng.choice(ORIGINALS)
        if rng.random() < 0.9:
            line = mangle(rng, line)
        for event in correlator.feed(line):
            assert_sane(event)

    assert correlator.lines == 20000
    assert correlator.skipped > 1000
    Correlator.restore(json.loads(json.dumps(correlator.dump())))


# --- property-based: hypothesis builds the hostile lines ----------------------

edits = st.one_of(
    st.tuples(st.just("insert"), st.integers(0, 400), st.sampled_from(TOKENS)),
    st.tuples(st.just("insert"), st.integers(0, 400), st.text(max_size=12)),
    st.tuples(st.just("drop"), st.integers(0, 400), st.integers(1, 30)),
    st.tuples(st.just("cut"), st.integers(0, 400), st.just(0)),
)


@st.composite
def mutated_sample(draw):
    """A sample or corpus line with a few edits at drawn places."""
    line = draw(st.sampled_from(ORIGINALS))
    for action, at, what in draw(st.lists(edits, max_size=4)):
        at = min(at, len(line))
        if action == "insert":
            line = line[:at] + what + line[at:]
        elif action == "drop":
            line = line[:at] + line[at + what :]
        else:
            line = line[:at]
    return line


def stamped(text):
    """Random text behind a valid stamp and a Postfix or scanner header."""
    return st.sampled_from(
        (
            "Dec  4 10:00:00 mx1 postfix/smtpd[1]: ",
            "Dec  4 10:00:01 mx1 postfix/postscreen[2]: ",
            "Dec  4 10:00:02 mx1 postfix/cleanup[3]: 0A1B2C3D4E: ",
            "2026-12-04T10:00:03+0100 mx1 postfix/qmgr[4]: 0A1B2C3D4E: ",
            "2026-12-04T10:00:04.5+00:00 mx1 amavis[5]: (5-01) ",
            "2026-12-04 10:00:05 #6(normal) <a1>; task; rspamd_task_write_log: ",
            "Dec  4 10:00:06 mx1 clamav-milter[7]: Message 0A1B2C3D4E ",
        )
    ).map(lambda head: head + text)


log_lines = st.one_of(
    mutated_sample(),
    st.sampled_from(ORIGINALS),
    st.text(max_size=200).flatmap(stamped),
    st.text(max_size=200),
    st.binary(max_size=200).map(lambda raw: raw.decode("utf-8", "replace")),
    st.binary(max_size=200).map(lambda raw: raw.decode("latin-1")),
)


@settings(
    max_examples=400,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(st.lists(log_lines, min_size=1, max_size=25))
def test_any_lines_give_only_sane_events_and_a_restorable_state(lines):
    correlator = Correlator(now=lambda: NOW)

    for line in lines:
        for event in correlator.feed(line):
            assert_sane(event)

    assert correlator.lines == len(lines)
    assert 0 <= correlator.skipped <= len(lines)
    state = json.loads(json.dumps(correlator.dump()))
    restored = Correlator.restore(state, now=lambda: NOW)
    assert restored.dump() == state
