"""The Approved list page (SPEC §3): IPs, CIDRs and domain names never blocked.

Approving lifts the blocks the record covers. A domain name is resolved to
its A and AAAA addresses, each approved, and looked up again on a schedule;
removing a name's row removes all its addresses.
"""

from flask import Blueprint
from flask import flash
from flask import redirect
from flask import render_template
from flask import url_for
from flask_wtf import FlaskForm
from wtforms import StringField
from wtforms.validators import InputRequired
from wtforms.validators import Length

from appliance import lists
from appliance import service
from web.blocks import MAX_ROW_ID
from web.blocks import RECORD_HINT
from web.blocks import actor
from web.blocks import name_resolver
from web.blocks import run_action
from web.wording import sentence

bp = Blueprint("approved", __name__)


class ApproveRecordForm(FlaskForm):
    """A record to approve, with a note saying why."""

    record = StringField(
        "IP, CIDR or domain name",
        validators=[InputRequired(f"Give {RECORD_HINT}."), Length(max=253)],
    )
    note = StringField("Note", validators=[Length(max=200)])


@bp.get("/approved")
def index():
    """The approved list, oldest first, and the form to add to it."""
    return render_index(ApproveRecordForm())


def render_index(form):
    """The page with `form` (and its messages) above the list."""
    return render_template("approved.html", form=form, entries=service.approved_hosts())


@bp.post("/approved/add")
def add():
    """Approve an IP, a CIDR or a domain name's addresses; lifts their blocks."""
    form = ApproveRecordForm()
    if not form.validate():
        return render_index(form)

    try:
        outcomes = lists.approve_record(
            form.record.data,
            actor=actor(),
            names=name_resolver(),
            note=(form.note.data or "").strip(),
        )
    except service.Refused as refusal:
        form.record.errors.append(sentence(f"Not approved: {refusal}"))
        return render_index(form)

    for outcome in outcomes:
        if outcome.refused:
            flash(
                sentence(f"{outcome.target} not approved: {outcome.refused}"), "refused"
            )
            continue
        lifted = sorted(set(outcome.lifted))
        lifted_text = f" (block on {', '.join(lifted)} lifted)" if lifted else ""
        flash(f"{outcome.target} approved{lifted_text}.", "ok")
    return redirect(url_for("approved.index"))


@bp.post("/approved/<int:entry_id>/remove")
def remove(entry_id):
    """Take an entry (a domain name: all its addresses) off the approved list."""

    def remove_entry():
        if not 0 < entry_id <= MAX_ROW_ID:
            raise service.Refused("that approved entry is no longer on the list")
        return lists.remove_approved(entry_id, actor=actor())

    return run_action(
        remove_entry,
        "Not removed",
        lambda removed: flash(f"{', '.join(removed)} no longer approved.", "ok"),
        back="approved.index",
    )
