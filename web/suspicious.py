"""The Suspicious IP log page (SPEC §4): filters, the table, blocking by hand.

Each entry's evidence, the log lines of its violations, has a page of its own.
"""

from urllib.parse import parse_qsl
from urllib.parse import urlencode

from flask import Blueprint
from flask import current_app
from flask import flash
from flask import g
from flask import redirect
from flask import render_template
from flask import request
from flask import url_for
from werkzeug.datastructures import MultiDict

from appliance import addresses
from appliance import evidence
from appliance import service
from appliance.config import THREAT_TYPES
from appliance.models import Rule
from appliance.models import SuspiciousEntry
from appliance.queries import FIRST_ORDER
from appliance.queries import PER_PAGE_CHOICES
from appliance.queries import SuspiciousQuery
from appliance.queries import active_blocks_for
from appliance.timefmt import format_duration
from appliance.timefmt import parse_duration
from web.dns import DomainName
from web.dns import lookup_address
from web.wording import counted
from web.wording import sentence

bp = Blueprint("suspicious", __name__)

COLUMNS = (
    ("time", "Time"),
    ("type", "Type"),
    ("ip", "IP"),
    ("violations", "Violations"),
    ("messages", "Messages"),
    ("rate", "Rate"),
    ("status", "Status"),
)
BLOCK_ACTIONS = ("temporary", "permanent")
FALLBACK_DURATION = 3600
MAX_DURATION = 30 * 86400


@bp.get("/suspicious")
@bp.get("/")
def index():
    """Show the log as the URL's filters, sort and page ask."""
    query, errors = query_from(request.args)
    return render_log(query, errors)


@bp.post("/suspicious/block")
def block():
    """Block the ticked rows' senders, then go back to the same view."""
    back = MultiDict(parse_qsl(request.form.get("back", ""), keep_blank_values=True))
    query, _ = query_from(back)
    action = request.form.get("action", "")
    ticked = request.form.getlist("entry")
    duration_text = request.form.get("duration", "").strip()

    problems, entries, duration = check_block_form(action, ticked, duration_text)
    if problems:
        return render_log(query, {}, problems, duration_text)

    actor = f"admin:{g.admin.username}"
    for category, message in block_entries(entries, action, duration, actor):
        flash(message, category)

    return redirect(url_for("suspicious.index", **query.to_args()))


@bp.get("/suspicious/<int:entry_id>")
def evidence_page(entry_id):
    """One entry and the violations it keeps, each with its log line or event."""
    back = MultiDict(parse_qsl(request.args.get("back", ""), keep_blank_values=True))
    query, errors = query_from(back)
    back_url = url_for("suspicious.index", **({} if errors else query.to_args()))
    entry = evidence.find_entry(entry_id)

    if entry is None:
        message = f"Entry {entry_id} is not in the Suspicious IP log."
        return render_template("evidence.html", missing=message, back_url=back_url), 404
    settings = current_app.extensions["settings"]
    blocks = active_blocks_for([entry], settings.widest_v4, settings.widest_v6)
    kept = evidence.for_entry(entry)
    return render_template(
        "evidence.html",
        entry=entry,
        block=blocks.get(entry.id),
        kept=kept,
        first_kept=evidence.FIRST_KEPT,
        latest_kept=evidence.LATEST_KEPT,
        is_json_event=evidence.is_json_event,
        counted_text=evidence.counted_text,
        back_url=back_url,
    )


def query_from(args):
    """The page's query from URL args, with the appliance's IPv6 prefix."""
    settings = current_app.extensions["settings"]
    return SuspiciousQuery.from_args(args, ipv6_prefix=settings.ipv6_prefix)


def render_log(query, errors, block_errors=(), duration_text=""):
    """The page: the form (with any messages), and the table when input is good."""
    settings = current_app.extensions["settings"]
    page = None
    blocks = {}
    names = {}
    if not errors:
        page = query.run()
        blocks = active_blocks_for(page.rows, settings.widest_v4, settings.widest_v6)
        if query.domains:
            names = domain_names(page.rows)

    columns = list(COLUMNS)
    if query.domains:
        columns.insert(3, ("domain", "Domain"))
    rule_durations = {rule.threat_type: rule.duration for rule in Rule.select()}
    back = urlencode(query.to_args(), doseq=True)
    return render_template(
        "suspicious.html",
        query=query,
        errors=errors,
        page=page,
        page_numbers=page_numbers(page.page, page.pages) if page else [],
        blocks=blocks,
        names=names,
        columns=columns,
        column_labels=dict(columns),
        arrows={"asc": "▲", "desc": "▼"},
        first_order=FIRST_ORDER,
        threat_types=THREAT_TYPES,
        per_page_choices=PER_PAGE_CHOICES,
        rule_durations=rule_durations,
        block_errors=block_errors,
        duration_text=duration_text,
        back=back,
        # each row's evidence link leads back to this same view
        evidence_args="?" + urlencode({"back": back}),
    )


def domain_names(rows):
    """PTR names by sender for a page of entries, within the page's DNS budget."""
    lookup = current_app.extensions["ptr_lookup"]
    wanted = {entry.sender: lookup_address(entry.sender) for entry in rows}
    found = lookup.names(wanted.values())
    return {sender: DomainName(found[address]) for sender, address in wanted.items()}


def check_block_form(action, ticked, duration_text):
    """Validate the block form: (problems, entries, seconds or None for the rule's)."""
    problems = []
    entries = []
    duration = None
    if action not in BLOCK_ACTIONS:
        problems.append("Choose Block Temporarily or Block Permanently.")

    ids = [int(v) for v in ticked if v.isascii() and v.isdigit() and len(v) < 19]
    if len(ids) != len(ticked):
        problems.append("The ticked rows are not entries of the log.")
    elif not ids:
        problems.append("Tick at least one row to block.")
    else:
        chosen = SuspiciousEntry.select().where(SuspiciousEntry.id.in_(ids))
        by_id = {entry.id: entry for entry in chosen}
        entries = [by_id[entry_id] for entry_id in ids if entry_id in by_id]
        if not entries:
            problems.append("The ticked rows are no longer in the log.")

    if action == "temporary" and duration_text:
        try:
            duration = parse_duration(duration_text)
        except ValueError as exc:
            problems.append(sentence(f"Duration: {exc}"))
        if duration is not None and not 0 < duration <= MAX_DURATION:
            problems.append("Duration: a temporary block lasts 1 second to 30 days.")
    return problems, entries, duration


def block_entries(entries, action, duration, actor):
    """Block each ticked sender once; yields (category, message) for each."""
    rule_durations = {rule.threat_type: rule.duration for rule in Rule.select()}
    done = set()
    for entry in entries:
        if entry.sender in done:
            continue
        done.add(entry.sender)
        if action == "permanent":
            seconds, span = None, "permanently"
        elif duration is not None:
            seconds = duration
            span = f"for {format_duration(seconds)}"
        else:
            seconds = rule_durations.get(entry.threat_type, FALLBACK_DURATION)
            span = f"for {format_duration(seconds)} (the {entry.threat_type} rule's)"
        reason = (
            f"by hand from the Suspicious IP log: {entry.threat_type}, "
            f"{counted(entry.violations, 'violation')} in "
            f"{counted(entry.messages, 'message')}"
        )

        try:
            service.block_network(
                addresses.parse_network(entry.sender),
                threat_type=entry.threat_type,
                duration=seconds,
                actor=actor,
                reason=reason,
            )
        except service.AlreadyBlocked as refusal:
            yield (
                "refused",
                (
                    f"{entry.sender} not blocked: already blocked by "
                    f"{describe_block(refusal.block)}."
                ),
            )
        except (service.Refused, addresses.AddressError) as refusal:
            yield "refused", sentence(f"{entry.sender} not blocked: {refusal}")
        else:
            yield "ok", f"{entry.sender} blocked {span}."


def describe_block(existing):
    """A block in a few words: its target and how long it lasts."""
    if existing.expires_at is None:
        return f"{existing.target} (permanent)"
    until = current_app.jinja_env.filters["utc"](existing.expires_at)
    return f"{existing.target} (until {until} UTC)"


def page_numbers(page, pages):
    """Page links around the current page, with None for a gap."""
    wanted = {1, pages, *range(page - 2, page + 3)}
    numbers = sorted(n for n in wanted if 1 <= n <= pages)
    shown = []
    for number in numbers:
        if shown and number - shown[-1] > 1:
            shown.append(None)
        shown.append(number)
    return shown


bp.add_app_template_filter(counted, "counted")
