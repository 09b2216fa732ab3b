"""The Log sources page: what each followed file gave, and what was not understood."""

from flask import Blueprint
from flask import render_template

from appliance.ingest import source_status

bp = Blueprint("sources", __name__)


@bp.get("/sources")
def index():
    """Per source: lines read, lines not understood, bytes still to read."""
    return render_template("sources.html", sources=source_status())
