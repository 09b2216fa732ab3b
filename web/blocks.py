"""The Blocked list page (SPEC §3): active blocks, their kernel status, the actions.

Manual records (an IP, a CIDR or a domain name) are added from the form at the
top; each row can be unblocked, moved to the approved list, made permanent or
extended. A row that came from a domain name acts for every address of it.
"""

import math

from flask import Blueprint
from flask import current_app
from flask import flash
from flask import g
from flask import redirect
from flask import render_template
from flask import request
from flask import url_for
from flask_wtf import FlaskForm
from wtforms import RadioField
from wtforms import StringField
from wtforms.fields.choices import SelectChoice
from wtforms.validators import InputRequired
from wtforms.validators import Length
from wtforms.validators import ValidationError

from appliance import kernelstatus
from appliance import lists
from appliance import service
from appliance.resolve import NameResolver
from appliance.timefmt import format_duration
from appliance.timefmt import parse_duration
from web.wording import sentence

bp = Blueprint("blocks", __name__)

PER_PAGE = 100
RECORD_HINT = "an IP, a CIDR network or a domain name"
# SQLite row ids are signed 64-bit: a larger id in a URL names no row
MAX_ROW_ID = 2**63 - 1


def checked_duration(text):
    """Seconds in a typed duration of 1 second to 30 days; ValidationError if not."""
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise ValidationError(str(exc)) from None
    if not 0 < seconds <= service.MAX_DURATION:
        raise ValidationError("a duration is 1 second to 30 days")
    return seconds


class BlockRecordForm(FlaskForm):
    """A manual block: what, for how long, why."""

    record = StringField(
        "IP, CIDR or domain name",
        validators=[InputRequired(f"Give {RECORD_HINT}."), Length(max=253)],
    )
    action = RadioField(
        "Block",
        choices=[
            SelectChoice("temporary", "temporarily"),
            SelectChoice("permanent", "permanently"),
        ],
        default="temporary",
    )
    duration = StringField("Duration", default="1h")
    reason = StringField("Reason", validators=[Length(max=200)])

    def validate_duration(self, field):
        """A temporary block needs a duration of 1 second to 30 days."""
        if self.action.data == "temporary":
            field.seconds = checked_duration(field.data)


def name_resolver():
    """The console's resolver for domain names on the lists, made once."""
    if "name_resolver" not in current_app.extensions:
        settings = current_app.extensions["settings"]
        current_app.extensions["name_resolver"] = NameResolver(
            settings.nameservers, settings.dns_timeout
        )
    return current_app.extensions["name_resolver"]


def actor():
    """How the audit log names the administrator acting."""
    return f"admin:{g.admin.username}"


@bp.get("/blocks")
def index():
    """Active blocks, oldest first, a page at a time, and the manual record form."""
    return render_index(BlockRecordForm())


def render_index(form):
    """The page with `form` (and its messages) above the list."""
    page = request.args.get("page", "1").strip()
    page_error = None
    if not (page.isascii() and page.isdigit() and len(page) <= 9 and int(page) >= 1):
        page_error = f"Page {page[:20]!r}: the page is a whole number from 1."
        page = "1"
    page = int(page)

    in_force = lists.blocks_in_force()
    total = in_force.count()
    pages = max(1, math.ceil(total / PER_PAGE))
    page = min(max(page, 1), pages)
    blocks = list(in_force.paginate(page, PER_PAGE))

    return render_template(
        "blocks.html",
        form=form,
        blocks=blocks,
        total=total,
        page=page,
        pages=pages,
        page_error=page_error,
        dry_run=lists.enforcement_backend() == "dry-run",
        settings=current_app.extensions["settings"],
    )


@bp.post("/blocks/add")
def add():
    """Block an IP, a CIDR or a domain name's addresses by hand."""
    form = BlockRecordForm()
    if not form.validate():
        return render_index(form)

    duration = form.duration.seconds if form.action.data == "temporary" else None
    span = f"for {format_duration(duration)}" if duration else "permanently"
    record = service.sender_record(form.record.data)
    if record != form.record.data.strip():
        span += f" (IPv6 senders are blocked per network: {form.record.data.strip()}"
        span += f" is in {record})"
    try:
        outcomes = lists.block_record(
            record,
            duration=duration,
            actor=actor(),
            names=name_resolver(),
            reason=(form.reason.data or "").strip() or "by hand from the Blocked list",
        )
    except service.Refused as refusal:
        form.record.errors.append(sentence(f"Not blocked: {refusal}"))
        return render_index(form)

    report(outcomes, f"blocked {span}", "not blocked")
    return redirect(url_for("blocks.index"))


def report(outcomes, done, refused):
    """Flash what happened to each address of a record."""
    succeeded = [outcome.target for outcome in outcomes if not outcome.refused]
    if succeeded:
        flash(f"{', '.join(succeeded)} {done}.", "ok")
    for outcome in outcomes:
        if outcome.refused:
            flash(sentence(f"{outcome.target} {refused}: {outcome.refused}"), "refused")


def run_action(action, refused, done, back="blocks.index"):
    """Run a list action; flash `done(result)`'s message or why it was refused."""
    try:
        result = action()
    except service.Refused as refusal:
        flash(sentence(f"{refused}: {refusal}"), "refused")
    else:
        done(result)
    return redirect(url_for(back))


def in_force(block_id):
    """`block_id` when a row can have it; Refused as for a lifted block if not."""
    if not 0 < block_id <= MAX_ROW_ID:
        raise service.Refused(f"block #{block_id} is no longer in force")
    return block_id


def targets_of(group):
    """The targets of a block group, for a message."""
    return ", ".join(block.target for block in group)


def flash_unblocked(lifted):
    """Say which targets an unblock lifted."""
    flash(f"Unblocked {', '.join(sorted(set(lifted)))}.", "ok")


@bp.post("/blocks/<int:block_id>/extend")
def extend(block_id):
    """Push a temporary block's end later by the typed duration."""
    try:
        seconds = checked_duration(request.form.get("duration", "").strip())
    except ValidationError as problem:
        flash(sentence(f"Not extended: {problem}"), "refused")
        return redirect(url_for("blocks.index"))

    def extended(group):
        until = current_app.jinja_env.filters["utc"](group[0].expires_at)
        span = format_duration(seconds)
        flash(f"{targets_of(group)} blocked {span} longer, until {until} UTC.", "ok")

    return run_action(
        lambda: lists.extend(in_force(block_id), seconds, actor=actor()),
        "Not extended",
        extended,
    )


@bp.post("/blocks/<int:block_id>/permanent")
def make_permanent(block_id):
    """Make a temporary block permanent."""
    return run_action(
        lambda: lists.make_permanent(in_force(block_id), actor=actor()),
        "Not changed",
        lambda group: flash(f"{targets_of(group)} blocked permanently now.", "ok"),
    )


@bp.post("/blocks/<int:block_id>/approve")
def approve(block_id):
    """Move a block to the approved list: approve its target, which lifts it."""
    return run_action(
        lambda: lists.move_to_approved(in_force(block_id), actor=actor()),
        "Not approved",
        lambda outcomes: report(
            outcomes, "moved to the approved list (block lifted)", "not approved"
        ),
    )


@bp.post("/blocks/<int:block_id>/unblock")
def unblock_one(block_id):
    """Lift one block (a domain name's row: all its blocks)."""
    return run_action(
        lambda: lists.unblock_block(in_force(block_id), actor=actor()),
        "Not unblocked",
        flash_unblocked,
    )


@bp.post("/blocks/unblock")
def unblock():
    """Lift the active blocks on one target (the API's and older pages' form)."""
    target = request.form.get("target", "").strip()

    if not target:
        flash("Say which address or network to unblock.", "refused")
        return redirect(url_for("blocks.index"))

    return run_action(
        lambda: service.unblock(target, actor=actor()), "Not unblocked", flash_unblocked
    )


# the table cell's class for each kernel status
STATUS_CLASS = {
    kernelstatus.IN_KERNEL: "kernel-yes",
    kernelstatus.NOT_IN_KERNEL: "kernel-no",
    kernelstatus.DRY_RUN: "kernel-no kernel-dry-run",
    kernelstatus.NOT_CHECKED: "kernel-unknown",
}


def kernel_status(block, dry_run=False):
    """What the last reconcile saw: (css class, words)."""
    words = kernelstatus.block_status(block, dry_run)
    return STATUS_CLASS[words], words


bp.add_app_template_global(kernel_status, "kernel_status")
