"""The JSON API under /api/v1/ (SPEC §5, §6): bearer tokens, no session, no CSRF.

Accepted events are not counted here: they are appended to the events spool,
a JSON-lines file the daemon follows like any mail log, so its profiler counts
them exactly once, in the same transaction as its read position. Blocks and
the approved list change through appliance.service, as the console's do, so
the lock-out guard and the audit log apply. docs/api.md describes it all;
openapi.json beside this file is its OpenAPI 3 document.
"""

import logging
import time
from pathlib import Path

from flask import Blueprint
from flask import current_app
from flask import g
from flask import jsonify
from flask import request
from werkzeug.exceptions import HTTPException

from appliance import addresses
from appliance import api_tokens
from appliance import evidence
from appliance import service
from appliance.cli import block_json
from appliance.cli import entry_json
from appliance.queries import SuspiciousQuery
from appliance.queries import active_blocks_for
from appliance.sources import jsonlines
from appliance.timefmt import iso
from appliance.timefmt import parse_duration
from web.auth import API_PREFIX

log = logging.getLogger(__name__)

bp = Blueprint("api", __name__, url_prefix="/api/v1")

MAX_EVENTS = 1000
MAX_BODY_BYTES = 1024 * 1024
OPENAPI = Path(__file__).with_name("openapi.json")
DEFAULT_DURATION = 3600
MAX_TEXT = 500
BLOCK_KEYS = {"target", "duration", "permanent", "reason"}
APPROVE_KEYS = {"target", "note"}
SUSPICIOUS_ARGS = {
    *("type", "from", "to", "ip", "per_page"),
    *("sort", "order", "then", "then_order", "page"),
}
CHOICE_ARGS = ("type", "per_page", "sort", "order", "then", "then_order", "page")


@bp.record_once
def create_token_table(state):
    """Make sure the token table exists (create_app's caller has connected)."""
    api_tokens.ensure_table()


@bp.before_app_request
def require_token():
    """Answer any /api/ request without a valid bearer token with 401 JSON."""
    if not request.path.startswith(API_PREFIX):
        return None
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    api_token = None
    if scheme.lower() == "bearer":
        api_token = api_tokens.verify_token(token.strip())
    if api_token is None:
        log.warning("%s: API request refused (no valid token)", request.remote_addr)
        response = error_response("a valid API token is required", 401)
        response.headers["WWW-Authenticate"] = 'Bearer realm="sender-filter"'
        return response
    g.api_token = api_token
    return None


@bp.app_errorhandler(HTTPException)
def http_error(error):
    """HTTP errors under /api/ as JSON; console pages keep their usual ones."""
    if not request.path.startswith(API_PREFIX):
        return error
    return error_response(error.description, error.code)


def error_response(message, status, index=None, **details):
    """A JSON error: `{"error": ...}`, with the failing event's `index` if any."""
    body = {"error": message, **details}
    if index is not None:
        body["index"] = index
    response = jsonify(body)
    response.status_code = status
    return response


@bp.post("/events")
def post_events():
    """Take one event or an array of them for the daemon; all are taken or none."""
    if request.mimetype != "application/json":
        return error_response("the body must be application/json", 415)
    if (request.content_length or 0) > MAX_BODY_BYTES:
        return error_response(f"the body is over {MAX_BODY_BYTES} bytes", 413)
    request.max_content_length = MAX_BODY_BYTES
    body = request.get_data(cache=False)

    try:
        reported = decode_body(body)
    except Refusal as refusal:
        return refusal_response(refusal)
    if not isinstance(reported, list):
        reported = [reported]
    if not reported:
        return error_response("the array holds no events", 400)
    if len(reported) > MAX_EVENTS:
        return error_response(f"at most {MAX_EVENTS} events per request", 413)
    now = time.time()
    events = []
    for index, item in enumerate(reported):
        try:
            events.append(jsonlines.parse_event(item, now))
        except jsonlines.EventError as exc:
            return error_response(str(exc), 400, index=index)

    spool = jsonlines.spool_path(current_app.extensions["settings"])
    try:
        jsonlines.append_to_spool(spool, events)
    except OSError as exc:
        log.error("%s: %d API events not written: %s", spool, len(events), exc)
        return error_response("the events could not be stored; try again", 503)

    log.info("%d events accepted from API token %s", len(events), g.api_token.name)
    return jsonify(accepted=len(events)), 202


class Refusal(Exception):
    """Bad input or a refused change, answered as a JSON error with `status`."""

    def __init__(self, message, status=400, **details):
        super().__init__(message)
        self.status = status
        self.details = details


@bp.errorhandler(Refusal)
def refusal_response(refusal):
    """A Refusal as its JSON error."""
    return error_response(str(refusal), refusal.status, **refusal.details)


@bp.get("/openapi.json")
def openapi():
    """The OpenAPI 3 document of this API."""
    return current_app.response_class(OPENAPI.read_bytes(), mimetype="application/json")


@bp.get("/suspicious")
def get_suspicious():
    """A page of the Suspicious IP log, with the console page's filters and sort."""
    settings = current_app.extensions["settings"]
    unknown = sorted(set(request.args) - SUSPICIOUS_ARGS)
    if unknown:
        raise Refusal(f"unknown parameter {unknown[0]!r}")
    # the console's form sends empty fields; an API caller means something
    for name in CHOICE_ARGS:
        if any(not value.strip() for value in request.args.getlist(name)):
            message = "the value is empty"
            raise Refusal(f"{name}: {message}", fields={name: message})
    query, errors = SuspiciousQuery.from_args(
        request.args, ipv6_prefix=settings.ipv6_prefix
    )
    if errors:
        message = "; ".join(f"{name}: {text}" for name, text in errors.items())
        raise Refusal(message, fields=errors)

    page = query.run()
    blocks = active_blocks_for(page.rows, settings.widest_v4, settings.widest_v6)
    entries = [
        {"id": entry.id, **entry_json(entry, blocks.get(entry.id))}
        for entry in page.rows
    ]
    return jsonify(
        total=page.total,
        page=page.page,
        pages=page.pages,
        per_page=query.per_page,
        entries=entries,
    )


@bp.get("/suspicious/<entry_id>/evidence")
def get_evidence(entry_id):
    """An entry and the violations it keeps, each with its log line or event."""
    settings = current_app.extensions["settings"]
    entry = None
    if entry_id.isascii() and entry_id.isdigit() and len(entry_id) < 20:
        entry = evidence.find_entry(int(entry_id))
    if entry is None:
        raise Refusal(f"entry {entry_id} is not in the Suspicious IP log", 404)

    blocks = active_blocks_for([entry], settings.widest_v4, settings.widest_v6)
    kept = evidence.for_entry(entry)
    return jsonify(
        entry={"id": entry.id, **entry_json(entry, blocks.get(entry.id))},
        violations=kept.total,
        kept=[list(numbers) for numbers in kept.ranges],
        keeps_first=evidence.FIRST_KEPT,
        keeps_latest=evidence.LATEST_KEPT,
        evidence=[evidence.row_json(row) for row in kept.rows],
    )


@bp.get("/blocks")
def get_blocks():
    """Every block in force now, oldest first."""
    return jsonify(blocks=[api_block_json(block) for block in service.active_blocks()])


@bp.post("/blocks")
def post_block():
    """Block an address or CIDR, temporarily (default 1h) or permanently."""
    body = json_object(BLOCK_KEYS)
    target = target_of(body.get("target"))
    duration = block_duration(body)
    reason = text_of(body, "reason")

    try:
        block = service.block(
            target,
            duration=duration,
            actor=api_actor(),
            reason=reason or "blocked through the API",
        )
    except service.AlreadyBlocked as refusal:
        raise Refusal(str(refusal), 409, block=api_block_json(refusal.block)) from None
    except service.Refused as refusal:
        raise Refusal(str(refusal), 422) from None

    return jsonify(api_block_json(block)), 201


@bp.delete("/blocks/<path:target>")
def delete_block(target):
    """Lift the blocks on exactly this address or CIDR."""
    target = target_of(target)

    try:
        lifted = service.unblock(target, actor=api_actor())
    except service.Refused as refusal:
        raise Refusal(str(refusal), 404) from None

    return jsonify(unblocked=lifted)


@bp.get("/approved")
def get_approved():
    """The approved list, oldest first."""
    return jsonify(approved=[approved_json(host) for host in service.approved_hosts()])


@bp.post("/approved")
def post_approved():
    """Approve an address or CIDR; its blocks are lifted."""
    body = json_object(APPROVE_KEYS)
    target = target_of(body.get("target"))
    note = text_of(body, "note")
    if target in {host.target for host in service.approved_hosts()}:
        raise Refusal(f"{target} is already approved", 409)

    try:
        approved, lifted = service.approve(target, actor=api_actor(), note=note)
    except service.Refused as refusal:
        raise Refusal(str(refusal), 422) from None

    return jsonify(approved=approved, lifted=lifted), 201


@bp.delete("/approved/<path:target>")
def delete_approved(target):
    """Take an address or CIDR off the approved list."""
    target = target_of(target)

    try:
        removed = service.unapprove(target, actor=api_actor())
    except service.Refused as refusal:
        raise Refusal(str(refusal), 404) from None

    return jsonify(unapproved=removed)


def api_actor():
    """Who acts, as the audit log names an API caller."""
    return f"api:{g.api_token.name}"


def json_object(keys):
    """The request's JSON object, holding none but `keys`; raises Refusal."""
    if request.mimetype != "application/json":
        raise Refusal("the body must be application/json", 415)
    if (request.content_length or 0) > MAX_BODY_BYTES:
        raise Refusal(f"the body is over {MAX_BODY_BYTES} bytes", 413)
    request.max_content_length = MAX_BODY_BYTES
    body = decode_body(request.get_data(cache=False) or b"null")
    if not isinstance(body, dict):
        raise Refusal("the body must be a JSON object")
    unknown = sorted(set(body) - keys)
    if unknown:
        raise Refusal(f"unknown key {unknown[0]!r}")
    return body


def decode_body(data):
    """A request body's JSON value, its text all characters; raises Refusal.

    JSON may escape half of a UTF-16 surrogate pair alone (`"\\ud800"`): that
    is no character, so no database or log file could store it.
    """
    try:
        value = jsonlines.loads_strict(data)
    except (ValueError, RecursionError) as exc:
        raise Refusal(f"the body is not valid JSON: {exc}") from None

    waiting = [value]
    while waiting:
        item = waiting.pop()
        if isinstance(item, dict):
            waiting.extend(item.keys())
            waiting.extend(item.values())
        elif isinstance(item, list):
            waiting.extend(item)
        elif isinstance(item, str) and not item.isascii():
            try:
                item.encode()
            except UnicodeEncodeError:
                raise Refusal(
                    f"the body holds {item[:40]!r}: a lone UTF-16 surrogate is "
                    "not a character"
                ) from None
    return value


def target_of(text):
    """An address or CIDR as the lists write it; raises Refusal."""
    if not isinstance(text, str) or not text.strip():
        raise Refusal("target is an IP address or CIDR network")
    try:
        network = addresses.parse_network(text)
    except ValueError as exc:
        raise Refusal(f"target: {exc}") from None
    return addresses.sender_text(network)


def text_of(body, key):
    """An optional short text of the body ('' when absent); raises Refusal."""
    text = body.get(key, "")
    if not isinstance(text, str) or len(text) > MAX_TEXT:
        raise Refusal(f"{key} is text of at most {MAX_TEXT} characters")
    return text


def block_duration(body):
    """Seconds a block lasts, None for a permanent one; raises Refusal."""
    permanent = body.get("permanent", False)
    if not isinstance(permanent, bool):
        raise Refusal("permanent is true or false")
    if "duration" not in body:
        return None if permanent else DEFAULT_DURATION
    if permanent:
        raise Refusal("a permanent block takes no duration")
    duration = body["duration"]
    if isinstance(duration, str):
        try:
            duration = parse_duration(duration)
        except ValueError as exc:
            raise Refusal(f"duration: {exc}") from None
    if isinstance(duration, bool) or not isinstance(duration, int):
        raise Refusal("duration is seconds or text such as 1h")
    if not 0 < duration <= service.MAX_DURATION:
        raise Refusal("a temporary block lasts 1 second to 30 days")
    return duration


def api_block_json(block):
    """A block as the CLI shows it, with whether the kernel enforces it."""
    return {**block_json(block), "enforced": block.enforced}


def approved_json(host):
    """An approved-list entry as JSON."""
    return {
        "target": host.target,
        "created_at": iso(host.created_at),
        "created_by": host.created_by,
        "note": host.note,
    }
