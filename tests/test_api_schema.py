"""Schemathesis against the API in process (WSGI): no 5xx, answers as documented."""

import pytest
import schemathesis
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.core.parameters import ParameterLocation
from schemathesis.specs.openapi.checks import content_type_conformance
from schemathesis.specs.openapi.checks import negative_data_rejection
from schemathesis.specs.openapi.checks import response_headers_conformance
from schemathesis.specs.openapi.checks import response_schema_conformance
from schemathesis.specs.openapi.checks import status_code_conformance
from test_web import add_entry

from appliance import api_tokens
from appliance import service
from appliance.models import Evidence
from web import create_app
from web.api import OPENAPI

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
    negative_data_rejection,
]


@pytest.fixture
def api_headers(settings):
    """The Authorization header of a fresh API token."""
    return {"Authorization": f"Bearer {api_tokens.create_token('schemathesis')}"}


@pytest.fixture
def api_app(settings):
    """The console over some state for the lists to show."""
    app = create_app(settings, {"TESTING": True})
    spam = add_entry("198.51.100.7", "spam")
    add_entry("2001:db8:1:2::/64", "virus")
    # evidence for entry 1, the operation's example: a log line and a JSON event
    for slot, source, line in (
        (1, "/var/log/mail.log", "Mar  1 11:50:00 mx1 postfix/smtpd[7]: reject"),
        (2, "/var/lib/sender-filter/events.jsonl", '{"ip":"198.51.100.7"}'),
    ):
        Evidence.create(
            entry=spam,
            slot=slot,
            number=slot,
            ts=spam.first_seen + slot,
            source=source,
            line=line,
            message=1,
            violations="spam",
            recipients=1,
            unknown=0,
        )
    service.block("198.51.100.7", duration=3600, actor="cli", reason="test")
    service.approve("203.0.113.0/24", actor="cli", note="partner")
    return app


# the events API answers 413 for a batch over 1000 events, as documented
HEADER = ParameterLocation.HEADER
REJECTIONS = [400, 401, 404, 405, 409, 413, 415, 422]
CONFIG = SchemathesisConfig.from_dict(
    {"checks": {"negative_data_rejection": {"expected-statuses": REJECTIONS}}}
)
# the document the app serves at /api/v1/openapi.json (test_api.py checks that)
schema = schemathesis.openapi.from_path(OPENAPI, config=CONFIG)


@schema.parametrize()
@hypothesis_settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
def test_api_answers_as_its_openapi_document_says(case, api_app, api_headers):
    # a case made to leave out or spoil the Authorization header goes without
    # the valid token, or the fixture would mend what it meant to break
    header_broken = case.meta is not None and case.meta.is_negative_at(HEADER)
    headers = {} if header_broken else api_headers
    case.call_and_validate(app=api_app, headers=headers, checks=CHECKS)
