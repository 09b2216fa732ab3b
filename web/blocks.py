"""The Blocked list page: every active block, each with an Unblock button."""

from flask import Blueprint
from flask import flash
from flask import g
from flask import redirect
from flask import render_template
from flask import request
from flask import url_for

from appliance import service

bp = Blueprint("blocks", __name__)


@bp.get("/blocks")
def index():
    """Active blocks, oldest first."""
    active = service.active_blocks()
    return render_template("blocks.html", blocks=active)


@bp.post("/blocks/unblock")
def unblock():
    """Lift the active blocks on one target."""
    target = request.form.get("target", "").strip()

    if not target:
        flash("Say which address or network to unblock.", "refused")
        return redirect(url_for("blocks.index"))

    try:
        lifted = service.unblock(target, actor=f"admin:{g.admin.username}")
    except service.Refused as refusal:
        flash(f"Not unblocked: {refusal}.", "refused")
    else:
        flash(f"Unblocked {', '.join(sorted(set(lifted)))}.", "ok")

    return redirect(url_for("blocks.index"))
