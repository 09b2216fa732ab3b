"""The JSON API's lists: the Suspicious IP log, blocks, the approved list."""

import json
import re
from datetime import datetime

import pytest
from test_web import HOUR
from test_web import NOON
from test_web import add_entry

from appliance import api_tokens
from appliance import service
from appliance.models import AuditEntry
from appliance.models import Block
from appliance.models import SuspiciousEntry
from appliance.sources import jsonlines
from web import create_app
from web.api import OPENAPI


@pytest.fixture
def app(settings):
    """The console as production builds it (CSRF on; the API is exempt)."""
    return create_app(settings, {"TESTING": True})


@pytest.fixture
def api(app):
    """A test client sending a valid token for `scanner` with every request."""
    token = api_tokens.create_token("scanner")
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {token}"
    return client


def ips(response):
    """The `ip` of each entry of a Suspicious IP log answer, in order."""
    return [entry["ip"] for entry in response.json["entries"]]


def seconds_between(start, end):
    """Seconds from one ISO time stamp of an answer to another."""
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).seconds


# the Suspicious IP log


def test_suspicious_filters_sorts_and_pages_like_the_page(api):
    for n in range(12):
        add_entry(f"198.51.100.{n}", "virus", last_seen=NOON + n * 60, violations=n + 1)
    add_entry("203.0.113.5", "spam", last_seen=NOON)
    add_entry("2001:db8:1:2::/64", "virus", last_seen=NOON - 2 * HOUR)

    by_ip = api.get("/api/v1/suspicious?type=virus&ip=198.51.100.0/28&sort=ip")
    second = api.get(
        "/api/v1/suspicious?type=virus&sort=violations&order=asc&per_page=10&page=2"
    )
    dated = api.get(
        "/api/v1/suspicious?from=2026-03-01T12:09&to=2026-03-01T12:10&sort=time"
    )

    assert by_ip.status_code == 200
    assert ips(by_ip) == [f"198.51.100.{n}" for n in range(12)]
    assert second.json["total"] == 13
    assert (second.json["page"], second.json["pages"]) == (2, 2)
    assert second.json["per_page"] == 10
    assert ips(second) == ["198.51.100.9", "198.51.100.10", "198.51.100.11"]
    # episodes last seen from 12:09 on, begun before 12:11, newest first
    assert ips(dated) == ["198.51.100.11", "198.51.100.10", "198.51.100.9"]


def test_suspicious_sorts_by_a_second_column_for_ties_of_the_first(api):
    # two senders per type, violations rising with the time last seen
    for n, threat_type in enumerate(("spam", "spam", "virus", "virus")):
        add_entry(
            f"198.51.100.{n}", threat_type, last_seen=NOON + n * 60, violations=n + 1
        )

    by_type = api.get("/api/v1/suspicious?sort=type&order=asc")
    then_most = api.get("/api/v1/suspicious?sort=type&order=asc&then=violations")
    then_fewest = api.get(
        "/api/v1/suspicious?sort=type&order=desc&then=violations&then_order=asc"
    )

    # without a second column, ties of an ascending first one go oldest first
    assert ips(by_type) == [f"198.51.100.{n}" for n in (0, 1, 2, 3)]
    # violations' first order is most first
    assert ips(then_most) == [f"198.51.100.{n}" for n in (1, 0, 3, 2)]
    assert ips(then_fewest) == [f"198.51.100.{n}" for n in (2, 3, 0, 1)]


def test_suspicious_entry_carries_its_values_and_its_block(api):
    entry = add_entry("203.0.113.5", "spam", violations=30, messages=120)
    service.block("203.0.113.5", duration=HOUR, actor="cli", reason="test")

    response = api.get("/api/v1/suspicious")

    block = Block.get(Block.target == "203.0.113.5")
    assert response.json["entries"] == [
        {
            "id": entry.id,
            "ip": "203.0.113.5",
            "type": "spam",
            "first_seen": "2026-03-01T11:50:00+00:00",
            "last_seen": "2026-03-01T12:00:00+00:00",
            "violations": 30,
            "messages": 120,
            "rate": 25.0,
            "status": "blocked",
            "block": block.id,
        }
    ]


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("type=worm", "type"),
        ("ip=198.51.100.7/24", "ip"),
        ("from=yesterday", "from"),
        ("from=2026-03-02&to=2026-03-01", "to"),
        ("per_page=7", "per_page"),
        ("sort=country", "sort"),
        ("order=up", "order"),
        ("page=0", "page"),
        ("sort=", "sort"),
        ("type=spam&type=", "type"),
        ("then=country", "then"),
        ("then=", "then"),
        ("then=ip&then_order=sideways", "then_order"),
    ],
)
def test_suspicious_bad_filter_gets_400_naming_the_field(api, query, field):
    response = api.get(f"/api/v1/suspicious?{query}")

    assert response.status_code == 400
    assert list(response.json["fields"]) == [field]
    assert response.json["error"].startswith(f"{field}: ")


def test_suspicious_unknown_parameter_gets_400(api):
    response = api.get("/api/v1/suspicious?typ=spam")

    assert response.status_code == 400
    assert response.json == {"error": "unknown parameter 'typ'"}


# blocks


def test_block_for_a_duration_then_list_and_unblock_it(api):
    entry = add_entry("203.0.113.5")

    created = api.post(
        "/api/v1/blocks",
        json={"target": "203.0.113.5", "duration": "2h", "reason": "spam run"},
    )
    listed = api.get("/api/v1/blocks")
    lifted = api.delete("/api/v1/blocks/203.0.113.5")
    after = api.get("/api/v1/blocks")

    assert created.status_code == 201
    block = created.json
    assert (block["target"], block["type"], block["action"]) == (
        "203.0.113.5",
        "manual",
        "temporary",
    )
    assert seconds_between(block["created_at"], block["expires_at"]) == 2 * HOUR
    assert (block["created_by"], block["reason"]) == ("api:scanner", "spam run")
    assert block["enforced"] is None
    assert listed.json == {"blocks": [block]}
    assert SuspiciousEntry.get_by_id(entry.id).status == "blocked"
    assert (lifted.status_code, lifted.json) == (200, {"unblocked": ["203.0.113.5"]})
    assert after.json == {"blocks": []}
    actions = [(a.actor, a.action, a.target) for a in AuditEntry.select()]
    assert actions[-2:] == [
        ("api:scanner", "block", "203.0.113.5"),
        ("api:scanner", "unblocked", "203.0.113.5"),
    ]


@pytest.mark.parametrize(
    ("body", "action", "seconds"),
    [
        ({"target": "198.51.100.0/24"}, "temporary", HOUR),
        ({"target": "198.51.100.0/24", "duration": 90}, "temporary", 90),
        ({"target": "198.51.100.0/24", "permanent": True}, "permanent", None),
    ],
)
def test_block_duration_defaults_to_an_hour(api, body, action, seconds):
    response = api.post("/api/v1/blocks", json=body)

    assert response.status_code == 201
    assert response.json["action"] == action
    if seconds is None:
        assert response.json["expires_at"] == ""
    else:
        start, end = response.json["created_at"], response.json["expires_at"]
        assert seconds_between(start, end) == seconds


def test_unblock_a_network_with_its_slash_plain_or_encoded(api):
    service.block("198.51.100.0/24", duration=HOUR, actor="cli")
    service.block("2001:db8:5::/48", duration=HOUR, actor="cli")

    plain = api.delete("/api/v1/blocks/198.51.100.0/24")
    encoded = api.delete("/api/v1/blocks/2001:db8:5::%2F48")

    assert plain.json == {"unblocked": ["198.51.100.0/24"]}
    assert encoded.json == {"unblocked": ["2001:db8:5::/48"]}


def test_blocking_what_the_guard_protects_is_refused_with_its_reason(api):
    service.approve("203.0.113.7", actor="cli")
    service.block("198.51.100.9", duration=HOUR, actor="cli")

    approved = api.post("/api/v1/blocks", json={"target": "203.0.113.0/24"})
    loopback = api.post("/api/v1/blocks", json={"target": "127.0.0.1"})
    wide = api.post("/api/v1/blocks", json={"target": "198.0.0.0/8"})
    again = api.post("/api/v1/blocks", json={"target": "198.51.100.9"})

    assert approved.status_code == 422
    assert approved.json["error"] == "203.0.113.0/24 covers approved 203.0.113.7"
    assert loopback.status_code == 422
    assert "loopback" in loopback.json["error"]
    assert wide.status_code == 422
    assert "wider than /16" in wide.json["error"]
    assert again.status_code == 409
    assert again.json["error"] == "198.51.100.9 is already blocked"
    assert again.json["block"]["target"] == "198.51.100.9"
    assert [b.target for b in service.active_blocks()] == ["198.51.100.9"]


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ("[1, 2]", 400, "the body must be a JSON object"),
        ("{", 400, "the body is not valid JSON"),
        ('{"target": "198.51.100.1", "target": "198.51.100.2"}', 400, "given twice"),
        ({"target": "198.51.100.1", "until": "1h"}, 400, "unknown key 'until'"),
        ({}, 400, "target is an IP address or CIDR network"),
        ({"target": 7}, 400, "target is an IP address or CIDR network"),
        ({"target": "mail.example.net"}, 400, "is not an IP address"),
        ({"target": "198.51.100.1/24"}, 400, "did you mean 198.51.100.0/24?"),
        ({"target": "198.51.100.1", "duration": 0}, 400, "1 second to 30 days"),
        ({"target": "198.51.100.1", "duration": 2592001}, 400, "1 second to 30 days"),
        ({"target": "198.51.100.1", "duration": "soon"}, 400, "not a duration"),
        (
            {"target": "198.51.100.1", "duration": "\u0663\u0660m"},
            400,
            "not a duration",
        ),
        ({"target": "198.51.100.1", "duration": "\uff13\uff10"}, 400, "not a duration"),
        ({"target": "198.51.100.1", "duration": True}, 400, "duration is seconds"),
        ({"target": "198.51.100.1", "duration": 1.5}, 400, "duration is seconds"),
        ({"target": "198.51.100.1", "duration": None}, 400, "duration is seconds"),
        (
            {"target": "198.51.100.1", "permanent": True, "duration": 60},
            400,
            "takes no duration",
        ),
        ({"target": "198.51.100.1", "permanent": "yes"}, 400, "true or false"),
        ({"target": "198.51.100.1", "reason": "x" * 501}, 400, "at most 500"),
    ],
)
def test_bad_block_request_gets_a_json_reason(api, body, status, message):
    data = body if isinstance(body, str) else json.dumps(body)

    response = api.post("/api/v1/blocks", data=data, content_type="application/json")

    assert response.status_code == status
    assert message in response.json["error"]
    assert Block.select().count() == 0


def test_a_block_body_that_is_not_json_gets_415(api):
    response = api.post("/api/v1/blocks", data="target=198.51.100.1")

    assert response.status_code == 415
    assert response.json == {"error": "the body must be application/json"}


@pytest.mark.parametrize(
    ("path", "status", "message"),
    [
        ("/api/v1/blocks/198.51.100.1", 404, "198.51.100.1 is not blocked"),
        ("/api/v1/blocks/not-an-ip", 400, "is not an IP address"),
        ("/api/v1/approved/198.51.100.1", 404, "not on the approved list"),
        ("/api/v1/approved/198.51.100.1/33", 400, "not an IP address or CIDR"),
    ],
)
def test_removing_what_is_not_listed_gets_a_json_reason(api, path, status, message):
    response = api.delete(path)

    assert response.status_code == status
    assert message in response.json["error"]


# the approved list


def test_approve_lifts_blocks_then_list_and_unapprove(api):
    service.block("198.51.100.9", duration=HOUR, actor="cli")

    created = api.post(
        "/api/v1/approved", json={"target": "198.51.100.0/24", "note": "partner MX"}
    )
    listed = api.get("/api/v1/approved")
    removed = api.delete("/api/v1/approved/198.51.100.0%2F24")
    after = api.get("/api/v1/approved")

    assert created.status_code == 201
    assert created.json == {"approved": "198.51.100.0/24", "lifted": ["198.51.100.9"]}
    assert service.active_blocks() == []
    [approved] = listed.json["approved"]
    assert (approved["target"], approved["note"]) == ("198.51.100.0/24", "partner MX")
    assert approved["created_by"] == "api:scanner"
    stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00"
    assert re.fullmatch(stamp, approved["created_at"])
    assert removed.json == {"unapproved": "198.51.100.0/24"}
    assert after.json == {"approved": []}


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"target": "198.51.100.7"}, 409, "198.51.100.7 is already approved"),
        ({"target": "10.0.0.0/8"}, 422, "wider than /16"),
        ({"target": "198.51.100.8", "note": 5}, 400, "note is text"),
        ({"target": "198.51.100.8", "why": ""}, 400, "unknown key 'why'"),
        ({"target": ""}, 400, "target is an IP address or CIDR network"),
    ],
)
def test_bad_or_refused_approval_gets_a_json_reason(api, body, status, message):
    service.approve("198.51.100.7", actor="cli")

    response = api.post("/api/v1/approved", json=body)

    assert response.status_code == status
    assert message in response.json["error"]
    assert [h.target for h in service.approved_hosts()] == ["198.51.100.7"]


# text that is no character


LONE_SURROGATE = "the body holds '\\ud800': a lone UTF-16 surrogate is not a character"


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/v1/blocks", '{"target": "198.51.100.201", "reason": "\\ud800"}'),
        ("/api/v1/blocks", '{"target": "198.51.100.201", "\\ud800": 1}'),
        ("/api/v1/approved", '{"target": "198.51.100.201", "note": "\\ud800"}'),
        ("/api/v1/events", '{"time": 1.0, "ip": "198.51.100.201", "id": "\\ud800"}'),
        ("/api/v1/events", '[{"ip": ["\\ud800"]}]'),
    ],
)
def test_a_lone_surrogate_in_a_body_gets_400_and_changes_nothing(
    api, settings, path, body
):
    # JSON may escape half a surrogate pair alone; no store could keep it
    audited = AuditEntry.select().count()

    response = api.post(path, data=body, content_type="application/json")

    assert response.status_code == 400
    assert response.json == {"error": LONE_SURROGATE}
    assert Block.select().count() == 0
    assert service.approved_hosts() == []
    assert AuditEntry.select().count() == audited
    assert not jsonlines.spool_path(settings).exists()


# the OpenAPI document


def test_openapi_document_describes_every_api_route(app, api):
    response = api.get("/api/v1/openapi.json")

    document = response.json
    assert response.status_code == 200
    assert document == json.loads(OPENAPI.read_text())
    assert document["openapi"].startswith("3.")
    described = {
        (f"/api/v1{path}", method.upper())
        for path, operations in document["paths"].items()
        for method in operations
    }
    routed = {
        (re.sub(r"<(?:path:)?(\w+)>", r"{\1}", rule.rule), method)
        for rule in app.url_map.iter_rules()
        if rule.rule.startswith("/api/v1/")
        for method in rule.methods - {"HEAD", "OPTIONS"}
    }
    assert described == routed
