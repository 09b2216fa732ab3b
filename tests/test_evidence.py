"""Evidence: each entry keeps the log lines (or events) of its violations.

A small gateway log written here, line by line, is read by `ingest` as the
command line reads it; the console page and the API then show exactly those
lines for the entry they made.
"""

import html
import json
import re

import pytest
from test_web import add_entry
from test_web import args_of
from test_web import links
from test_web import make_app
from test_web import page_text
from web_session import logged_in

from appliance import api_tokens
from appliance import ingest
from appliance.models import Evidence
from appliance.models import SuspiciousEntry

SPAMMER = "198.51.100.20"
HARVESTER = "203.0.113.30"
CLEAN = "192.0.2.40"
SCANNER = "2001:db8:7::9"
SCANNER_SENDER = "2001:db8:7::/64"
SPAM_MESSAGES = 25
START = "2026-03-01T10"


def stamp(minute, second):
    """An RFC 3339 stamp on 1 March 2026, 10:mm:ss UTC."""
    return f"{START}:{minute:02d}:{second:02d}.000000+00:00"


def spam_transaction(n):
    """The lines of the spammer's `n`th message, rejected as spam after DATA."""
    queue_id = f"{0xA0000 + n:05X}0000B"
    pid = 2000 + n
    host = f"bulk.example.net[{SPAMMER}]"
    return [
        f"{stamp(n, 0)} mx1 postfix/smtpd[{pid}]: connect from {host}",
        f"{stamp(n, 1)} mx1 postfix/smtpd[{pid}]: {queue_id}: client={host}",
        f"{stamp(n, 3)} mx1 postfix/cleanup[{pid + 1}]: {queue_id}: milter-reject: "
        f"END-OF-MESSAGE from {host}: 5.7.1 Spam message rejected; "
        f"from=<deal{n}@bulk.example.net> to=<alice@example.com> proto=ESMTP "
        "helo=<bulk.example.net>",
        f"{stamp(n, 4)} mx1 postfix/smtpd[{pid}]: disconnect from {host} "
        "ehlo=1 mail=1 rcpt=1 data=0/1 quit=1 commands=4/5",
    ]


def harvest_probe(n):
    """The harvester's `n`th probe, a session of its own: an unknown recipient."""
    return (
        f"{stamp(n, 30)} mx1 postfix/smtpd[{3000 + n}]: NOQUEUE: reject: RCPT from "
        f"unknown[{HARVESTER}]: 550 5.1.1 <user{n}@example.com>: Recipient address "
        "rejected: User unknown in virtual mailbox table; from=<x@probe.example> "
        f"to=<user{n}@example.com> proto=ESMTP helo=<[{HARVESTER}]>"
    )


def clean_transaction():
    """One accepted message from a clean sender: counted, no violation."""
    host = f"mail.example.org[{CLEAN}]"
    return [
        f"{stamp(40, 0)} mx1 postfix/smtpd[4000]: connect from {host}",
        f"{stamp(40, 1)} mx1 postfix/smtpd[4000]: 4C1EA40000: client={host}",
        f"{stamp(40, 2)} mx1 postfix/qmgr[800]: 4C1EA40000: from=<news@example.org>, "
        "size=2048, nrcpt=1 (queue active)",
        f"{stamp(40, 3)} mx1 postfix/smtpd[4000]: disconnect from {host} "
        "ehlo=1 mail=1 rcpt=1 data=1 quit=1 commands=5",
    ]


def spam_line(n):
    """The line that charged the spammer's `n`th violation."""
    return spam_transaction(n)[2]


def gateway_log():
    """The whole log: 25 spam messages, 3 harvest probes, one clean message."""
    lines = []
    for n in range(1, SPAM_MESSAGES + 1):
        lines += spam_transaction(n)
        if n <= 3:
            lines.append(harvest_probe(n))
    return lines + clean_transaction()


def scanner_events():
    """JSON-lines events of another scanner: one with two verdicts, one clean."""
    return [
        json.dumps({"time": f"{START}:50:00Z", "ip": SCANNER, "message": True}),
        json.dumps(
            {
                "time": f"{START}:51:00Z",
                "ip": SCANNER,
                "message": True,
                "verdicts": ["spam", "virus"],
                "recipients": 2,
                "id": "q-77",
            }
        ),
    ]


def read(settings, path, lines):
    """Append lines to a log and catch up on it as `sender-filter ingest` does."""
    with open(path, "a") as log:
        log.writelines(line + "\n" for line in lines)
    return ingest.read_files(settings, [str(path)])


def entry_of(sender, threat_type):
    """The one entry of a sender and type."""
    return SuspiciousEntry.get(
        (SuspiciousEntry.sender == sender)
        & (SuspiciousEntry.threat_type == threat_type)
    )


def kept(entry):
    """An entry's evidence rows as (number, slot, line), by number."""
    rows = Evidence.select().where(Evidence.entry == entry.id)
    return [(r.number, r.slot, r.line) for r in rows.order_by(Evidence.number)]


@pytest.fixture
def log_path(settings, tmp_path):
    """The gateway log, read once."""
    path = tmp_path / "mail.log"
    read(settings, path, gateway_log())
    return path


@pytest.fixture
def app(settings):
    """The console, CSRF checks on as in production."""
    return make_app(settings)


def test_an_entry_keeps_its_first_10_and_latest_10_violations_with_their_lines(
    log_path,
):
    spam = entry_of(SPAMMER, "spam")

    assert spam.violations == SPAM_MESSAGES
    numbers = [*range(1, 11), *range(16, 26)]
    assert kept(spam) == [
        # 16..20 fell to the ring slots 16..20, 21..25 replaced 11..15
        (n, n if n <= 20 else n - 10, spam_line(n))
        for n in numbers
    ]
    first = Evidence.get((Evidence.entry == spam.id) & (Evidence.number == 1))
    assert first.source == str(log_path)
    assert first.ts == spam.first_seen
    assert (first.message, first.violations, first.recipients, first.unknown) == (
        0,
        "spam",
        0,
        0,
    )


def test_reject_lines_are_the_evidence_of_a_harvest(log_path):
    dha = entry_of(HARVESTER, "dha")

    assert kept(dha) == [(n, n, harvest_probe(n)) for n in (1, 2, 3)]
    probe = Evidence.get((Evidence.entry == dha.id) & (Evidence.number == 2))
    assert (probe.message, probe.violations, probe.recipients, probe.unknown) == (
        1,
        "dha",
        1,
        1,
    )


def test_a_sender_without_violations_leaves_no_evidence(log_path):
    assert SuspiciousEntry.select().where(SuspiciousEntry.sender == CLEAN).count() == 0
    assert Evidence.select().count() == 20 + 3


def test_evidence_read_in_several_batches_is_the_evidence_read_at_once(
    settings, tmp_path
):
    lines = gateway_log()
    # each read is its own transaction: violations 11..15 are replaced by
    # 21..25 in later ones, and the ninth transaction's line ends a batch
    cuts = [0, 9, 40, 70, 97, len(lines)]

    for start, end in zip(cuts, cuts[1:], strict=False):
        read(settings, tmp_path / "mail.log", lines[start:end])

    numbers = [*range(1, 11), *range(16, 26)]
    assert kept(entry_of(SPAMMER, "spam")) == [
        (n, n if n <= 20 else n - 10, spam_line(n)) for n in numbers
    ]
    assert kept(entry_of(HARVESTER, "dha")) == [
        (n, n, harvest_probe(n)) for n in (1, 2, 3)
    ]


def test_an_entry_deleted_takes_its_evidence_with_it(log_path):
    spam = entry_of(SPAMMER, "spam")

    spam.delete_instance()

    assert Evidence.select().where(Evidence.entry == spam.id).count() == 0
    assert Evidence.select().count() == 3


def test_reading_the_log_again_adds_no_evidence(settings, log_path):
    before = list(Evidence.select().tuples())

    summary = ingest.read_files(settings, [str(log_path)])

    assert summary["lines"] == 0
    assert list(Evidence.select().tuples()) == before


def test_the_page_shows_the_kept_lines_and_what_was_left_out(app, log_path):
    client = logged_in(app)
    spam = entry_of(SPAMMER, "spam")

    response = client.get(f"/suspicious/{spam.id}")
    text = page_text(response)
    lines = [
        html.unescape(line)
        for line in re.findall(r'<td class="line">([^<]*)</td>', text)
    ]
    numbers = re.findall(r'<tr id="violation-(\d+)">', text)
    kept_note = " ".join(
        re.search(r'<p class="note" id="evidence-kept">(.*?)</p>', text, re.S)[
            1
        ].split()
    )

    assert response.status_code == 200
    assert f"Evidence for {SPAMMER} (spam)" in text
    assert lines == [spam_line(n) for n in [*range(1, 11), *range(16, 26)]]
    assert numbers == [str(n) for n in [*range(1, 11), *range(16, 26)]]
    assert kept_note == (
        "20 of the 25 violations of this entry, oldest first: 1–10 and 16–25. "
        "An entry keeps its first 10 and its latest 10 violations."
    )
    assert '<td colspan="5">5 violations counted, not kept</td>' in text
    assert text.count(f'<td class="source">{log_path}</td>') == 20
    assert "<td>2026-03-01 10:01:03</td>" in text


def test_each_row_of_the_log_links_to_its_evidence_and_back(app, log_path):
    client = logged_in(app)
    dha = entry_of(HARVESTER, "dha")
    view = f"/suspicious?ip={HARVESTER}&type=dha&per_page=10"

    log_page = client.get(view)
    evidence_links = [h for h in links(log_page) if h.startswith("/suspicious/")]
    evidence_page = client.get(evidence_links[0])
    back = re.search(r'<a id="back" href="([^"]*)"', page_text(evidence_page))
    lines = re.findall(r'<td class="line">([^<]*)</td>', page_text(evidence_page))

    assert len(evidence_links) == 1
    assert evidence_links[0].startswith(f"/suspicious/{dha.id}?back=")
    assert [html.unescape(line) for line in lines] == [
        harvest_probe(n) for n in (1, 2, 3)
    ]
    assert "All 3 violations of this entry, oldest first." in page_text(evidence_page)
    # back to the very view the row was in
    assert args_of(html.unescape(back[1])) == {
        "type": ["dha"],
        "ip": [HARVESTER],
        "per_page": ["10"],
        "sort": ["time"],
        "order": ["desc"],
    }


def test_a_missing_entry_is_said_so_on_the_page(app, log_path):
    client = logged_in(app)

    for entry_id in ("99999", str(2**64)):
        response = client.get(f"/suspicious/{entry_id}")

        assert response.status_code == 404
        assert f"Entry {entry_id} is not in the Suspicious IP log." in page_text(
            response
        )


def test_the_api_gives_the_evidence_as_json(app, log_path):
    api = app.test_client()
    api.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {api_tokens.create_token('t')}"
    dha = entry_of(HARVESTER, "dha")

    answer = api.get(f"/api/v1/suspicious/{dha.id}/evidence")

    assert answer.status_code == 200
    body = answer.json
    assert body["entry"]["id"] == dha.id
    assert (body["entry"]["ip"], body["entry"]["type"]) == (HARVESTER, "dha")
    assert (body["violations"], body["kept"]) == (3, [[1, 3]])
    assert (body["keeps_first"], body["keeps_latest"]) == (10, 10)
    assert body["evidence"][0] == {
        "number": 1,
        "time": "2026-03-01T10:01:30+00:00",
        "source": str(log_path),
        "format": "log",
        "line": harvest_probe(1),
        "counted": {
            "message": True,
            "violations": ["dha"],
            "recipients": 1,
            "unknown_recipients": 1,
        },
    }
    assert [e["line"] for e in body["evidence"]] == [
        harvest_probe(n) for n in (1, 2, 3)
    ]


@pytest.mark.parametrize("entry_id", ["99999", "0", "-1", "abc", str(2**64)])
def test_the_api_answers_404_for_an_entry_that_is_not_there(app, entry_id):
    api = app.test_client()
    api.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {api_tokens.create_token('t')}"

    answer = api.get(f"/api/v1/suspicious/{entry_id}/evidence")

    assert answer.status_code == 404
    assert answer.is_json and "error" in answer.json


def test_a_json_lines_event_is_shown_as_its_json_in_both_entries(
    settings, tmp_path, app
):
    spool = tmp_path / "events.jsonl"
    read(settings, spool, scanner_events())
    client = logged_in(app)
    verdict = scanner_events()[1]

    for threat_type in ("spam", "virus"):
        entry = entry_of(SCANNER_SENDER, threat_type)
        row = Evidence.get(Evidence.entry == entry.id)
        page = page_text(client.get(f"/suspicious/{entry.id}"))
        shown = re.search(r'<td class="line event"[^>]*><pre>([^<]*)</pre>', page)[1]

        assert (row.number, row.line, row.source) == (1, verdict, str(spool))
        assert (row.message, row.violations, row.recipients) == (1, "spam,virus", 2)
        assert json.loads(html.unescape(shown)) == json.loads(verdict)
        assert "a new message, spam, virus, 2 recipients" in page


def test_an_entry_counted_before_evidence_was_kept_says_so(app):
    entry = add_entry("198.51.100.99", "virus", violations=4, messages=8)
    client = logged_in(app)

    text = page_text(client.get(f"/suspicious/{entry.id}"))

    assert "No evidence is kept for this entry" in " ".join(text.split())
    assert '<table class="log evidence">' not in text
