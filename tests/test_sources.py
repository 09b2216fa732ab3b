"""Mail-log sources: annotated sample lines, the public corpus, a real capture, state.

The annotated sample format is described in tests/annotated.py and
docs/sources.md; robustness (fuzzing) is in test_sources_fuzz.py and time
stamps in test_sources_stamps.py.
"""

import json
from datetime import datetime

import pytest
from annotated import SAMPLES
from annotated import all_samples
from annotated import expected_events
from annotated import read_as_utc

from appliance.config import THREAT_TYPES
from appliance.sources.correlate import Correlator
from appliance.sources.postfix import read_smtpd

try:
    from tests.conftest import CORPUS
    from tests.conftest import require
except ImportError:  # tests/ is not a package: pytest put tests/ on sys.path
    from conftest import CORPUS
    from conftest import require

NOW = datetime.fromisoformat("2026-12-04T12:00:00+00:00").timestamp()
REAL_CAPTURE = SAMPLES / "postfix-real.log"
SAMPLE_LINES = all_samples()


@pytest.fixture(autouse=True)
def utc(monkeypatch):
    """Classic stamps are local time: read them as UTC in these tests."""
    yield from read_as_utc(monkeypatch)


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


def test_samples_cover_every_program_read():
    programs = ("/smtpd[", "/postscreen[", "/cleanup[", "/qmgr[", "amavis")
    programs += ("rspamd", "clamav-milter[", "postfix-in/", "/submission/")

    missing = [p for p in programs if not any(p in s.line for s in SAMPLE_LINES)]

    assert missing == []


# --- a real Postfix capture and the public corpus ----------------------------


def feed_file(correlator, path):
    """Feed a file's lines as the follower reads them; returns the events."""
    events = []
    with open(path, "rb") as handle:
        for raw in handle:
            events.extend(correlator.feed(raw.decode("utf-8", "replace")))
    return events


def test_real_capture_is_understood_and_matches_its_disconnect_counters():
    correlator = Correlator(now=lambda: NOW)

    events = feed_file(correlator, REAL_CAPTURE)

    assert correlator.skipped == 0
    charged, counted = {}, {}
    for event in events:
        messages, recipients = charged.get(event.ip, (0, 0))
        charged[event.ip] = (messages + event.message, recipients + event.recipients)
    for line in REAL_CAPTURE.read_text().splitlines():
        if " disconnect from " in line:
            ip = line.split("[", 2)[2].split("]")[0]
            words = dict(w.split("=") for w in line.split() if "=" in w)
            messages, recipients = counted.get(ip, (0, 0))
            mail = int(words.get("mail", "0").split("/")[0])
            rcpt = int(words.get("rcpt", "0").split("/")[-1])
            counted[ip] = (messages + mail, recipients + rcpt)
    assert charged == counted


def corpus_files():
    """The public corpus logs; skipped (failed under CI) when absent."""
    require(CORPUS.is_dir(), f"needs the public corpus in {CORPUS}")
    files = sorted(CORPUS.glob("*.log"))
    require(bool(files), f"no *.log files in {CORPUS}")
    return files


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


def test_corpus_verdicts_are_the_expected_ones():
    found = set()

    for path in corpus_files():
        correlator = Correlator(now=lambda: NOW)
        for event in feed_file(correlator, path):
            found.update((event.ip, v) for v in event.violations if v != "dha")

    assert ("93.184.216.34", "spam") in found  # RBL reject, smtpd
    assert ("216.245.194.173", "spam") in found  # DNSBL reject, postscreen
    assert ("192.0.2.151", "spam") in found  # bare milter reject at DATA


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


def test_state_saved_before_sessions_were_kept_still_restores():
    saved = {
        "version": 1,
        "lines": 7,
        "skipped": 1,
        "newest": NOW,
        "pruned_at": NOW,
        "groups": {"postfix/smtpd[1]": ["192.0.2.5", "a@example.com", NOW, ["dha"]]},
        "queue": {"0A0A0A0A0A": ["192.0.2.6", None, NOW, ["queued"]]},
    }

    correlator = Correlator.restore(saved, now=lambda: NOW)

    assert (correlator.lines, correlator.skipped, correlator.sessions) == (7, 1, {})
    assert correlator.queue["0A0A0A0A0A"].flags == {"queued"}
    assert correlator.dump()["queue"]["0A0A0A0A0A"][4] is None


def test_state_forgets_removed_and_stale_queue_ids_and_sessions():
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
    correlator.feed(start + "smtpd[5]: connect from d.example.net[192.0.2.8]")

    assert set(correlator.dump()["queue"]) == {"0A0A0A0A0A", "0B0B0B0B0B"}
    assert set(correlator.dump()["sessions"]) == {"postfix/smtpd[5]"}

    correlator.feed(
        "2026-12-01T12:00:00+00:00 mx1 postfix/smtpd[4]: connect from x[::1]"
    )
    assert set(correlator.dump()["queue"]) == {"0B0B0B0B0B"}
    assert correlator.dump()["sessions"] == {}

    correlator.feed(
        "2026-12-03T12:00:00+00:00 mx1 postfix/smtpd[4]: connect from x[::1]"
    )
    assert correlator.dump()["queue"] == {}


REJECT = "NOQUEUE: reject: RCPT from a.example.net[192.0.2.9]: 554 5.7.1 "
MILTER = "0A0A0A0A0A: milter-reject: END-OF-MESSAGE from a.example.net[192.0.2.9]: "


@pytest.mark.parametrize(
    ("reply", "sender"),
    [
        (
            "<b@example.com>: bad; from=<s@example.org> to=<b@example.com>",
            "s@example.org",
        ),
        ("<b@example.com>: mailfrom=<x@y> bad; from=<s@example.org>", "s@example.org"),
        (
            "<b@example.com>: xfrom=<from=<s@example.org> to=<b@example.com>",
            "s@example.org",
        ),
        ("<b@example.com>: é-from=<s@example.org>", "s@example.org"),
        ("<b@example.com>: éfrom=<s@example.org>", None),
        (
            "<b@example.com>: from=<s @example.org> from=<t@example.org>",
            "t@example.org",
        ),
    ],
)
def test_reject_sender_is_the_first_from_that_starts_a_word(reply, sender):
    assert read_smtpd(REJECT + reply, 0.0, "postfix/smtpd[1]").sender == sender


@pytest.mark.parametrize(
    ("reply", "verdict"),
    [
        ("5.7.1 Message contains a VIRUS (Eicar-Test)", "virus"),
        ("5.7.1 Malware found", "virus"),
        ("5.7.1 İnfected message", "virus"),
        ("5.7.1 Spam message rejected", "spam"),
        ("5.7.1 Małware-ish but not quite", "spam"),
    ],
)
def test_milter_reply_naming_malware_in_any_case_is_a_virus(reply, verdict):
    assert read_smtpd(MILTER + reply, 0.0, "postfix/smtpd[1]").verdict == verdict
