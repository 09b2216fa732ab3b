"""The correlator's one-match fast path (HOT) reads lines as `maillog.parse` does.

Lines are fed twice: through `Correlator.feed`, where HOT splits the
commonest lines (sessions, queue files, RCPT rejects, cleanup's milter
verdicts, amavis verdicts), and again with HOT matching nothing, so every line
goes through `maillog.parse` and its program's reader. Each line's events,
the skipped count and the saved state must be the same.
"""

import random
import re

import pytest
from annotated import read_as_utc

from appliance.sources import correlate
from appliance.sources.correlate import Correlator

try:
    from tests.test_sources_fuzz import NOW
    from tests.test_sources_fuzz import ORIGINALS
    from tests.test_sources_fuzz import mangle
except ImportError:  # tests/ is not a package: pytest put tests/ on sys.path
    from test_sources_fuzz import NOW
    from test_sources_fuzz import ORIGINALS
    from test_sources_fuzz import mangle

NEVER = re.compile(r"(?!)")
# the edits that move where HOT and the readers' patterns split a reject line
SPLIT_EDITS = ("]", "[", ":", ": ", ":25", ":25:", " ", "", "\r", "-", "0", "A")
REJECT_KINDS = {"rcpt", "milter", "blocked"}
# the neighbours of the forms HOT splits: other stages, actions and verdicts
NEIGHBOURS = (
    (" RCPT from ", (" VRFY from ", " MAIL from ", " DATA from ", " CONNECT from ")),
    (": reject: ", (": milter-reject: ", ": reject_warning: ", ": hold: ")),
    (" END-OF-MESSAGE from ", (" CONNECT from ", " RCPT from ", " DATA from ")),
    (": milter-reject: ", (": milter-discard: ", ": milter-hold: ", ": reject: ")),
    (" Blocked ", (" Passed ", " Blocked CLEAN ", " Blocked SPAMMY-1 ")),
)


@pytest.fixture(autouse=True)
def utc(monkeypatch):
    """Classic stamps are local time: read them as UTC in these tests."""
    yield from read_as_utc(monkeypatch)


def read_all(lines, alone):
    """Each line's events, then the skipped count and the state, from one stream.

    `alone`: each line is read by a correlator of its own (the states of all).
    """
    if alone:
        read = [read_all([line], alone=False) for line in lines]
        per_line, skipped, states = zip(*read, strict=True)
        return [events for [events] in per_line], sum(skipped), states
    correlator = Correlator(now=lambda: NOW)
    per_line = [correlator.feed(line) for line in lines]
    return per_line, correlator.skipped, correlator.dump()


def assert_read_alike(lines, monkeypatch, alone=False):
    """The lines give the same events and state with HOT as without it."""
    fast, fast_skipped, fast_state = read_all(lines, alone)
    with monkeypatch.context() as patched:
        patched.setattr(correlate, "HOT", NEVER)
        parsed, parsed_skipped, parsed_state = read_all(lines, alone)

    for line, fast_events, parsed_events in zip(lines, fast, parsed, strict=True):
        assert fast_events == parsed_events, line
    assert fast_skipped == parsed_skipped
    assert fast_state == parsed_state


def split_kinds(lines):
    """How many lines HOT splits as each kind of reject or verdict."""
    kinds = {}
    for line in lines:
        found = correlate.HOT.match(line, line.find(" mx1 ") + 1)
        if found is not None and found.lastgroup in REJECT_KINDS:
            kinds[found.lastgroup] = kinds.get(found.lastgroup, 0) + 1
    return kinds


def reject_lines():
    """Sample and corpus lines HOT splits as a reject or an amavis verdict."""
    return [line for line in ORIGINALS if split_kinds([line])]


def test_samples_and_corpus_read_alike_with_and_without_hot(monkeypatch):
    lines = ORIGINALS + [line + "\r" for line in ORIGINALS]

    assert_read_alike(lines, monkeypatch)
    assert set(split_kinds(lines)) == REJECT_KINDS


def test_neighbours_of_the_reject_forms_read_alike(monkeypatch):
    lines = [
        line.replace(form, neighbour, 1)
        for line in reject_lines()
        for form, neighbours in NEIGHBOURS
        if form in line
        for neighbour in neighbours
    ]

    assert_read_alike(lines, monkeypatch)
    assert_read_alike(lines, monkeypatch, alone=True)
    assert len(lines) > 100


def test_reject_lines_edited_where_they_split_read_alike(monkeypatch):
    rng = random.Random(20261205)
    originals = reject_lines()
    lines = []
    for _ in range(4000):
        line = rng.choice(originals)
        # an edit in the first 160 characters: the stamp, header, client and text
        at = rng.randrange(min(len(line), 160))
        lines.append(
            line[:at] + rng.choice(SPLIT_EDITS) + line[at + rng.randint(0, 2) :]
        )

    assert_read_alike(lines, monkeypatch)
    # the edits leave many lines HOT still splits, and push others to the readers
    kinds = split_kinds(lines)
    assert set(kinds) == REJECT_KINDS
    assert 1000 < sum(kinds.values()) < len(lines)


def test_mangled_lines_read_alike(monkeypatch):
    rng = random.Random(20261206)
    lines = [mangle(rng, rng.choice(ORIGINALS)) for _ in range(6000)]

    assert_read_alike(lines, monkeypatch)
