"""Other scanners' events: the JSON-lines format, API tokens, POST /api/v1/events."""

import json
import time
from datetime import UTC
from datetime import datetime

import pytest

from appliance import api_tokens
from appliance.events import MailEvent
from appliance.ingest import Pipeline
from appliance.ingest import Source
from appliance.models import AuditEntry
from appliance.models import Block
from appliance.models import SourceCounter
from appliance.models import SuspiciousEntry
from appliance.models import WindowBatch
from appliance.profiler import Profiler
from appliance.sources import jsonlines
from appliance.sources.correlate import Correlator
from appliance.sources.jsonlines import JsonLinesDecoder
from web import create_app

NOON = datetime(2026, 12, 1, 12, 0, tzinfo=UTC).timestamp()
STAMP = "2026-12-01T12:00:00Z"
SENDER = "192.0.2.7"


def clock():
    """The decoder's wall clock in these tests: an hour after NOON."""
    return NOON + 3600


def line(**fields):
    """One JSON-lines event; time and ip default to NOON and SENDER."""
    fields.setdefault("time", STAMP)
    fields.setdefault("ip", SENDER)
    return json.dumps(fields)


def decoded(*lines, decoder=None):
    """Every MailEvent the lines make, through one decoder."""
    decoder = decoder or JsonLinesDecoder(now=clock)
    return [event for text in lines for event in decoder.feed(text)]


# the format: each valid line with the event it must give

VALID = [
    (
        line(message=True, verdicts=["spam"], recipients=2),
        MailEvent(NOON, SENDER, 1, ("spam",), 2, 0),
    ),
    (
        line(time=NOON + 0.25, ip="2001:db8::1", message=1),
        MailEvent(NOON + 0.25, "2001:db8::1", 1),
    ),
    (line(ip="::ffff:192.0.2.8", message=True), MailEvent(NOON, "192.0.2.8", 1)),
    (line(time="2026-12-01T13:00:00+01:00", message=True), MailEvent(NOON, SENDER, 1)),
    (
        line(time="2026-12-01t12:00:00.5z", message=True),
        MailEvent(NOON + 0.5, SENDER, 1),
    ),
    (line(verdicts=["virus"]), MailEvent(NOON, SENDER, 0, ("virus",))),
    (
        line(message=True, verdicts=["virus", "spam"]),
        MailEvent(NOON, SENDER, 1, ("spam", "virus")),
    ),
    (
        line(message=True, recipients=3, unknown_recipients=2),
        MailEvent(NOON, SENDER, 1, ("dha",), 3, 2),
    ),
    (line(recipients=4, message=0), MailEvent(NOON, SENDER, 0, (), 4, 0)),
    (line(message=True, id="4XyZ1@mx1"), MailEvent(NOON, SENDER, 1)),
]

MALFORMED = [
    ('{"time": "2026-12-01T12:00:00Z", "ip":', "not JSON"),
    ('"a string"', "not an object"),
    ('[{"time": 1764590400, "ip": "192.0.2.7", "message": true}]', "an array"),
    (line(message=True, verdict=["spam"]), "unknown key"),
    (
        '{"time": 1764590400, "ip": "192.0.2.7", "ip": "192.0.2.8", "message": 1}',
        "twice",
    ),
    ('{"time": NaN, "ip": "192.0.2.7", "message": true}', "NaN time"),
    ('{"time": 1e999, "ip": "192.0.2.7", "message": true}', "infinite time"),
    (json.dumps({"ip": SENDER, "message": True}), "no time"),
    (line(time="yesterday", message=True), "time in words"),
    (line(time="2026-12-01T12:00:00", message=True), "time without a zone"),
    (line(time="2026-12-01", message=True), "date only"),
    (line(time="2026-02-30T12:00:00Z", message=True), "no such day"),
    (line(time=True, message=True), "time true"),
    (line(time=0, message=True), "time before 2000"),
    (line(time=NOON + 3600 + 2 * 86400, message=True), "time two days ahead"),
    (json.dumps({"time": STAMP, "message": True}), "no ip"),
    (line(ip=3221225991, message=True), "ip as a number"),
    (line(ip="192.0.2.300", message=True), "not an address"),
    (line(ip="127.0.0.1", message=True), "loopback"),
    (line(ip="::1", message=True), "IPv6 loopback"),
    (line(ip="::ffff:127.0.0.2", message=True), "mapped loopback"),
    (line(ip="0.0.0.0", message=True), "unspecified"),
    (line(ip="224.0.0.9", message=True), "multicast"),
    (line(message=2), "message 2"),
    (line(message="yes"), "message in words"),
    (line(message=1.0), "message as a float"),
    (line(verdicts="spam"), "verdicts not a list"),
    (line(verdicts=["phishing"]), "unknown verdict"),
    (line(verdicts=["spam", "spam"]), "verdict twice"),
    (line(message=True, recipients=-1), "negative recipients"),
    (line(message=True, recipients=1.5), "fractional recipients"),
    (line(message=True, recipients=True), "recipients true"),
    (line(message=True, recipients="2"), "recipients as text"),
    (line(message=True, recipients=10001), "too many recipients"),
    (line(message=True, recipients=1, unknown_recipients=2), "more unknown than all"),
    (line(message=True, id=""), "empty id"),
    (line(message=True, id=7), "numeric id"),
    (line(message=True, id="x" * 129), "long id"),
    (line(message=True, id="a\nb"), "id with a newline"),
    (line(message=True, id=None), "null id"),
    (line(), "counts nothing"),
    (line(message=False, verdicts=[], recipients=0), "counts nothing, explicitly"),
]


@pytest.mark.parametrize(("text", "expected"), VALID)
def test_valid_line_gives_its_event(text, expected):
    decoder = JsonLinesDecoder(now=clock)

    # an event with violations carries its own JSON, the entry's evidence
    evidence = text if expected.violations else None
    assert decoder.feed(text) == [expected._replace(line=evidence)]
    assert (decoder.lines, decoder.skipped) == (1, 0)


@pytest.mark.parametrize(("text", "case"), MALFORMED)
def test_malformed_line_is_skipped_and_counted(text, case):
    decoder = JsonLinesDecoder(now=clock)

    assert decoder.feed(text) == [], case
    assert (decoder.lines, decoder.skipped) == (1, 1), case


def test_blank_line_is_neither_an_event_nor_skipped():
    decoder = JsonLinesDecoder(now=clock)

    assert decoder.feed("  \n") == []
    assert (decoder.lines, decoder.skipped) == (1, 0)


def test_overlong_line_is_skipped():
    decoder = JsonLinesDecoder(now=clock)

    assert decoder.feed(line(message=True, pad=" " * 5000)) == []
    assert decoder.skipped == 1


def test_deeply_nested_line_is_skipped_not_fatal():
    decoder = JsonLinesDecoder(now=clock)

    assert decoder.feed("[" * 4000 + "]" * 4000) == []
    assert decoder.skipped == 1


def test_a_spool_line_decodes_to_the_event_it_was_written_from():
    event = jsonlines.parse_event(
        json.loads(line(message=True, recipients=2, unknown_recipients=1, id="q1")),
        clock(),
    )

    written = jsonlines.encode_event(event)

    assert written.endswith(b"\n") and written.count(b"\n") == 1
    assert jsonlines.parse_event(jsonlines.loads_strict(written), clock()) == event


# transaction ids


def test_a_verdict_for_a_counted_id_does_not_count_the_message_again():
    verdict = line(time=NOON + 30, message=True, verdicts=["spam"], id="q1")
    events = decoded(line(message=True, recipients=2, id="q1"), verdict)

    assert events == [
        MailEvent(NOON, SENDER, 1, (), 2, 0),
        MailEvent(NOON + 30, SENDER, 0, ("spam",), 0, 0, verdict),
    ]


def test_an_event_sent_twice_with_its_id_counts_once():
    text = line(message=True, verdicts=["virus"], recipients=1, id="q1")

    assert decoded(text, text) == [MailEvent(NOON, SENDER, 1, ("virus",), 1, 0, text)]


def test_recipients_with_an_id_are_totals_and_count_only_their_increase():
    unknown = line(time=NOON + 5, recipients=5, unknown_recipients=1, id="q1")
    events = decoded(
        line(message=True, recipients=2, id="q1"),
        unknown,
        line(time=NOON + 9, recipients=5, unknown_recipients=3, id="q1"),
    )

    assert events == [
        MailEvent(NOON, SENDER, 1, (), 2, 0),
        MailEvent(NOON + 5, SENDER, 0, ("dha",), 3, 1, unknown),
        MailEvent(NOON + 9, SENDER, 0, (), 0, 2),
    ]


def test_the_same_id_from_another_sender_is_another_transaction():
    events = decoded(
        line(message=True, id="q1"), line(ip="198.51.100.4", message=True, id="q1")
    )

    assert [(e.ip, e.message) for e in events] == [(SENDER, 1), ("198.51.100.4", 1)]


def test_an_id_is_forgotten_an_hour_after_its_last_event():
    decoder = JsonLinesDecoder(now=lambda: NOON + 86400)
    decoded(line(message=True, id="q1"), decoder=decoder)
    decoded(line(time=NOON + 3601, ip="198.51.100.4", message=True), decoder=decoder)

    again = decoded(line(time=NOON + 3602, message=True, id="q1"), decoder=decoder)

    assert again == [MailEvent(NOON + 3602, SENDER, 1)]


def test_only_the_most_recently_named_ids_are_kept(monkeypatch):
    monkeypatch.setattr(jsonlines, "MAX_IDS", 2)
    decoder = JsonLinesDecoder(now=clock)
    decoded(*(line(message=True, id=f"q{n}") for n in range(3)), decoder=decoder)

    assert list(decoder.charged) == [f"{SENDER} q1", f"{SENDER} q2"]


# state


def test_dump_and_restore_go_on_as_if_never_stopped():
    lines = [
        line(time=NOON + n, message=True, recipients=1, id=f"q{n % 4}")
        for n in range(8)
    ] + [line(time=NOON + 9, verdicts=["spam"], id="q2"), "not json"]
    straight = JsonLinesDecoder(now=clock)
    expected = decoded(*lines, decoder=straight)

    first = JsonLinesDecoder(now=clock)
    events = decoded(*lines[:5], decoder=first)
    state = json.loads(json.dumps(first.dump()))
    second = JsonLinesDecoder.restore(state, now=clock)
    events += decoded(*lines[5:], decoder=second)

    assert events == expected
    assert second.dump() == straight.dump()
    assert (second.lines, second.skipped) == (10, 1)


def test_foreign_state_starts_a_fresh_decoder():
    correlator_state = Correlator().dump()

    decoder = JsonLinesDecoder.restore(correlator_state, now=clock)

    assert (decoder.lines, decoder.charged) == (0, {})


def test_the_mail_log_correlator_ignores_a_decoder_state():
    decoder = JsonLinesDecoder(now=clock)
    decoded(line(message=True, id="q1"), decoder=decoder)

    correlator = Correlator.restore(decoder.dump())

    assert (correlator.lines, correlator.queue) == (0, {})


# the spool


def test_spool_appends_whole_lines(tmp_path):
    spool = tmp_path / "events.jsonl"
    event = jsonlines.parse_event(json.loads(line(message=True)), clock())

    jsonlines.append_to_spool(spool, [event, event])
    jsonlines.append_to_spool(spool, [event])

    assert spool.read_bytes() == jsonlines.encode_event(event) * 3


def test_a_torn_line_in_the_spool_stays_a_line_of_its_own(tmp_path):
    spool = tmp_path / "events.jsonl"
    spool.write_text('{"time": 1764590')
    event = jsonlines.parse_event(json.loads(line(message=True)), clock())

    jsonlines.append_to_spool(spool, [event])

    decoder = JsonLinesDecoder(now=clock)
    assert decoded(*spool.read_text().splitlines(), decoder=decoder) == [
        MailEvent(NOON, SENDER, 1)
    ]
    assert decoder.skipped == 1


def test_a_failed_spool_write_leaves_the_spool_as_it_was(tmp_path, monkeypatch):
    spool = tmp_path / "events.jsonl"
    event = jsonlines.parse_event(json.loads(line(message=True)), clock())
    jsonlines.append_to_spool(spool, [event])
    before = spool.read_bytes()
    real_write = jsonlines.os.write

    def short_write(descriptor, payload):
        return real_write(descriptor, payload[:10])

    monkeypatch.setattr(jsonlines.os, "write", short_write)
    with pytest.raises(OSError):
        jsonlines.append_to_spool(spool, [event, event])

    assert spool.read_bytes() == before


# tokens


def test_a_token_is_shown_once_and_only_its_hash_is_stored(settings):
    token = api_tokens.create_token("rspamd-relay")

    stored = api_tokens.ApiToken.get(api_tokens.ApiToken.name == "rspamd-relay")
    assert token.startswith("sf_") and len(token) > 40
    assert token not in json.dumps(stored.__data__)
    assert stored.token_hash == api_tokens.token_hash(token)
    assert api_tokens.verify_token(token).name == "rspamd-relay"
    assert api_tokens.verify_token(token + "x") is None
    assert AuditEntry.get(AuditEntry.action == "token add").target == "rspamd-relay"


def test_a_revoked_token_stops_working(settings):
    token = api_tokens.create_token("old-scanner")

    api_tokens.revoke_token("old-scanner")

    assert api_tokens.verify_token(token) is None
    assert api_tokens.list_tokens() == []
    assert AuditEntry.get(AuditEntry.action == "token revoke").target == "old-scanner"


@pytest.mark.parametrize("name", ["", "-x", "has space", "x" * 65, "a/b"])
def test_a_token_name_must_be_plain(settings, name):
    with pytest.raises(api_tokens.TokenError):
        api_tokens.create_token(name)


def test_token_names_are_unique_and_revoking_needs_a_known_name(settings):
    api_tokens.create_token("relay")

    with pytest.raises(api_tokens.TokenError, match="already exists"):
        api_tokens.create_token("relay")
    with pytest.raises(api_tokens.TokenError, match="no API token"):
        api_tokens.revoke_token("nobody")


def test_last_used_is_noted_at_most_once_a_minute(settings):
    token = api_tokens.create_token("relay")

    api_tokens.verify_token(token, now=NOON)
    api_tokens.verify_token(token, now=NOON + 30)
    first = api_tokens.list_tokens()[0].last_used
    api_tokens.verify_token(token, now=NOON + 60)

    assert first == NOON
    assert api_tokens.list_tokens()[0].last_used == NOON + 60


# the API


@pytest.fixture
def app(settings):
    """The console with CSRF checks on, as in production."""
    return create_app(settings, {"TESTING": True})


@pytest.fixture
def token(app):
    """A valid API token."""
    return api_tokens.create_token("scanner")


def post(app, body, token=None, content_type="application/json"):
    """POST /api/v1/events; `body` is sent as JSON unless it is already text."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    data = body if isinstance(body, str | bytes) else json.dumps(body)
    return app.test_client().post(
        "/api/v1/events", data=data, headers=headers, content_type=content_type
    )


def spooled(settings):
    """The spool's lines as decoded JSON ([] when it does not exist)."""
    spool = jsonlines.spool_path(settings)
    if not spool.exists():
        return []
    return [json.loads(text) for text in spool.read_text().splitlines()]


def recent(**fields):
    """One event as a dict, an hour before the wall clock."""
    fields.setdefault("time", time.time() - 3600)
    fields.setdefault("ip", SENDER)
    return fields


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer", "Bearer sf_wrong", "Basic c2Nhbm5lcjp4", "Bearer " + "x" * 500],
)
def test_events_without_a_valid_token_get_401_json(app, token, authorization):
    headers = {"Authorization": authorization} if authorization else {}

    response = app.test_client().post(
        "/api/v1/events", json=recent(message=True), headers=headers
    )

    assert response.status_code == 401
    assert response.is_json and "token" in response.json["error"]
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert spooled(app.extensions["settings"]) == []


def test_every_api_path_needs_a_token_never_the_login_page(app):
    paths = [r.rule for r in app.url_map.iter_rules() if r.rule.startswith("/api/")]
    paths += ["/api/v1/nothing-here", "/api/v2/events"]

    for path in paths:
        for method in ("GET", "POST", "PUT", "DELETE"):
            response = app.test_client().open(path, method=method)
            assert response.status_code == 401, (path, method)
            assert response.is_json, (path, method)


def test_a_revoked_token_is_refused(app, token):
    api_tokens.revoke_token("scanner")

    assert post(app, recent(message=True), token).status_code == 401


def test_api_errors_with_a_token_are_json(app, token):
    headers = {"Authorization": f"Bearer {token}"}

    missing = app.test_client().get("/api/v1/nothing-here", headers=headers)
    wrong_method = app.test_client().get("/api/v1/events", headers=headers)

    assert (missing.status_code, missing.is_json) == (404, True)
    assert (wrong_method.status_code, wrong_method.is_json) == (405, True)


def test_console_pages_still_send_strangers_to_login(app):
    response = app.test_client().get("/blocks")

    assert response.status_code == 302


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", ""]
)
def test_a_body_that_is_not_json_gets_415(app, token, content_type):
    response = post(app, recent(message=True), token, content_type=content_type)

    assert response.status_code == 415
    assert response.is_json and "application/json" in response.json["error"]


@pytest.mark.parametrize(
    "body", ['{"time": ', "", '[{"a": NaN}]', b"\xff\xfe{", '{"a": 1, "a": 2}']
)
def test_a_body_that_is_not_valid_json_gets_400(app, token, settings, body):
    response = post(app, body, token)

    assert response.status_code == 400
    assert "not valid JSON" in response.json["error"]
    assert "index" not in response.json
    assert spooled(settings) == []


BODY_LEVEL = ("not JSON", "twice", "NaN time")


@pytest.mark.parametrize(("text", "case"), MALFORMED)
def test_each_malformed_event_gets_400_and_nothing_is_written(
    app, token, settings, text, case
):
    if case == "time two days ahead":
        text = line(time=time.time() + 2 * 86400, message=True)
    good = json.dumps(recent(message=True))
    body = f"[{good}, {good}, {text}]"

    response = post(app, body, token)

    assert response.status_code == 400, case
    assert response.json["error"], case
    assert response.json.get("index") == (None if case in BODY_LEVEL else 2), case
    assert spooled(settings) == [], case


def test_a_malformed_event_alone_is_index_0(app, token, settings):
    response = post(app, recent(message=True, verdicts=["phishing"]), token)

    assert response.status_code == 400
    assert response.json == {
        "error": "verdict 'phishing' is not one of spam, virus, dha, bounce",
        "index": 0,
    }


def test_one_event_is_accepted_and_spooled_in_its_checked_form(app, token, settings):
    sent = recent(ip="::ffff:192.0.2.9", message=1, verdicts=["virus", "spam"])

    response = post(app, sent, token)

    assert response.status_code == 202
    assert response.json == {"accepted": 1}
    assert spooled(settings) == [
        {
            "time": sent["time"],
            "ip": "192.0.2.9",
            "message": True,
            "verdicts": ["spam", "virus"],
        }
    ]


def test_a_batch_is_accepted_whole(app, token, settings):
    batch = [recent(message=True, id=f"q{n}", recipients=n) for n in range(1, 4)]

    response = post(app, batch, token)

    assert (response.status_code, response.json) == (202, {"accepted": 3})
    assert [e["id"] for e in spooled(settings)] == ["q1", "q2", "q3"]


def test_an_empty_batch_is_refused(app, token, settings):
    response = post(app, [], token)

    assert response.status_code == 400
    assert spooled(settings) == []


def test_more_than_a_thousand_events_are_refused(app, token, settings):
    response = post(app, [recent(message=True)] * 1001, token)

    assert response.status_code == 413
    assert response.is_json
    assert spooled(settings) == []


def test_a_body_over_a_megabyte_is_refused(app, token, settings):
    body = json.dumps([recent(message=True, id="x" * 100)] * 1000) + " " * 2**20

    response = post(app, body, token)

    assert response.status_code == 413
    assert response.is_json
    assert spooled(settings) == []


def test_a_spool_that_cannot_be_written_gets_503(app, token, settings, monkeypatch):
    def refuse(path, events):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(jsonlines, "append_to_spool", refuse)

    response = post(app, recent(message=True), token)

    assert response.status_code == 503
    assert response.is_json


# end to end: posted through the API, counted by the daemon's pipeline


def spool_source(settings):
    """The daemon's Source on the events spool; a `*.jsonl` log is read as events."""
    source = Source(jsonlines.spool_path(settings))
    assert isinstance(source.decoder, JsonLinesDecoder)
    return source


def daemon_reads(settings):
    """Read the spool to its end as a freshly started daemon would."""
    profiler = Profiler(settings)
    profiler.load()
    pipeline = Pipeline(profiler)
    source = spool_source(settings)
    while pipeline.step(source, limit=4):
        pass
    source.file.close()
    return profiler


def at(minute, **fields):
    """An event `minute` minutes after NOON from SENDER."""
    return {"time": NOON + minute * 60, "ip": SENDER, **fields}


def test_posted_events_are_counted_exactly_once_across_restarts(app, token, settings):
    first = [
        at(0, message=True, recipients=1, id="m0"),
        at(1, message=True, recipients=1, id="m1"),
        at(2, message=True, recipients=1, id="m2", verdicts=["spam"]),
        at(3, message=True, recipients=1, id="m3"),
        at(3.5, verdicts=["spam"], id="m3"),
        at(4, message=True, recipients=1, id="m4"),
    ]
    second = first[-2:] + [
        at(5, message=True, id="m5", verdicts=["spam"]),
        at(
            5,
            ip="198.51.100.4",
            message=True,
            recipients=3,
            unknown_recipients=2,
            id="b1",
        ),
        at(6, message=True, id="m6"),
        at(6.5, message=True, id="m5", verdicts=["spam"]),
    ]

    assert post(app, first, token).status_code == 202
    daemon_reads(settings)
    assert post(app, second, token).status_code == 202
    assert post(app, second, token).status_code == 202
    profiler = daemon_reads(settings)

    entries = {
        (e.sender, e.threat_type): (e.violations, e.messages, e.rate)
        for e in SuspiciousEntry.select()
    }
    assert entries == {
        (SENDER, "spam"): (3, 5, 60.0),
        ("198.51.100.4", "dha"): (1, 1, 100.0),
    }
    assert profiler.history[SENDER].sums["spam"] == [7, 3, 5, 0]
    assert profiler.history["198.51.100.4"].sums["dha"] == [1, 1, 3, 2]
    stored = [json.loads(batch.events) for batch in WindowBatch.select()]
    assert sum(map(len, stored)) == 9
    counter = SourceCounter.get(SourceCounter.path == source_path(settings))
    assert (counter.lines, counter.skipped) == (6 + 6 + 6, 0)


def source_path(settings):
    """The spool's path as the daemon's Source records it."""
    return str(jsonlines.spool_path(settings))


def test_a_daemon_started_before_the_spool_exists_reads_it_once_it_does(
    app, token, settings
):
    profiler = Profiler(settings)
    pipeline = Pipeline(profiler)
    source = spool_source(settings)
    assert pipeline.step(source) == 0

    post(app, [at(0, message=True), at(1, message=True, verdicts=["virus"])], token)

    assert pipeline.step(source) == 2
    assert profiler.history[SENDER].sums["virus"] == [2, 1, 0, 0]
    source.file.close()


def test_posted_spam_crosses_the_rule_and_blocks(make_settings, tmp_path):
    settings = make_settings("[rules.spam]\nmessages = 3\nrate = 50\n")
    app = create_app(settings, {"TESTING": True})
    token = api_tokens.create_token("scanner")
    batch = [
        at(n, message=True, id=f"m{n}", verdicts=["spam"] if n % 3 else [])
        for n in range(6)
    ]

    assert post(app, batch, token).json == {"accepted": 6}
    daemon_reads(settings)

    block = Block.get()
    assert (block.target, block.threat_type) == (SENDER, "spam")
    assert block.created_at == NOON + 4 * 60
    assert SuspiciousEntry.get().status == "blocked"


def test_a_time_too_large_for_a_float_is_skipped_not_fatal():
    decoder = JsonLinesDecoder.restore({})
    line = '{"time": 1' + "0" * 400 + ', "ip": "198.51.100.9", "message": true}'

    assert decoder.feed(line) == []

    assert (decoder.lines, decoder.skipped) == (1, 1)
