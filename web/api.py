"""The JSON API under /api/v1/ (SPEC §5, §6): bearer tokens, no session, no CSRF.

Accepted events are not counted here: they are appended to the events spool,
a JSON-lines file the daemon follows like any mail log, so its profiler counts
them exactly once, in the same transaction as its read position.
"""

import logging
import time

from flask import Blueprint
from flask import current_app
from flask import g
from flask import jsonify
from flask import request
from werkzeug.exceptions import HTTPException

from appliance import api_tokens
from appliance.sources import jsonlines
from web.auth import API_PREFIX

log = logging.getLogger(__name__)

bp = Blueprint("api", __name__, url_prefix="/api/v1")

MAX_EVENTS = 1000
MAX_BODY_BYTES = 1024 * 1024


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


def error_response(message, status, index=None):
    """A JSON error: `{"error": ...}`, with the failing event's `index` if any."""
    body = {"error": message}
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
        reported = jsonlines.loads_strict(body)
    except (ValueError, RecursionError) as exc:
        return error_response(f"the body is not valid JSON: {exc}", 400)
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
