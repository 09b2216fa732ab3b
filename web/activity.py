"""The Sender filtering log page: block starts and ends, and recorded actions."""

import time

from flask import Blueprint
from flask import current_app
from flask import render_template
from flask import request

from appliance.activity import PER_PAGE_CHOICES
from appliance.activity import ActivityQuery
from appliance.activity import block_end

bp = Blueprint("activity", __name__)


@bp.get("/activity")
def index():
    """One list (blocks or actions), filtered by IP and dates, one page of it."""
    query, errors = ActivityQuery.from_args(request.args)

    page = None
    if not errors:
        settings = current_app.extensions["settings"]
        page = query.run(settings.widest_v4, settings.widest_v6)

    now = time.time()
    ends = {}
    if page is not None and query.view == "blocks":
        ends = {block.id: block_end(block, now) for block in page.rows}
    return render_template(
        "activity.html",
        query=query,
        errors=errors,
        page=page,
        ends=ends,
        per_page_choices=PER_PAGE_CHOICES,
    )
