"""The Overview page (SPEC §5): top senders per type, counts, violations over time."""

import logging
import threading
import time
from datetime import UTC
from datetime import datetime

from flask import Blueprint
from flask import current_app
from flask import render_template
from flask import request

from appliance.config import THREAT_TYPES
from appliance.models import db
from appliance.overview import PERIODS
from appliance.overview import overview

log = logging.getLogger(__name__)

bp = Blueprint("overview", __name__)

DEFAULT_PERIOD = "day"
# how old a period's figures may get before new ones are worked out: a week of
# a 1M-entry log takes seconds to read
CACHE_SECONDS = {"hour": 10, "day": 60, "week": 300}
# how a chart bucket's start reads, per period
LABEL_FORMATS = {"hour": "%H:%M", "day": "%H:%M", "week": "%a %d %H:%M"}


@bp.get("/overview")
def index():
    """The overview for the period the URL names (default: the last 24 hours)."""
    period = request.args.get("period", DEFAULT_PERIOD).strip().lower()
    error = None
    if period not in PERIODS:
        error = f"{period[:40]!r} is not a period; choose hour, day or week"
        period = DEFAULT_PERIOD

    figures = cached_overview(period)

    labels = [
        datetime.fromtimestamp(start, UTC).strftime(LABEL_FORMATS[period])
        for start in figures.bucket_starts
    ]
    # a list, not a mapping, so the legend keeps the threat types' order
    series = [[t, figures.series[t]] for t in THREAT_TYPES]
    chart = {"labels": labels, "series": series}
    return render_template(
        "overview.html",
        figures=figures,
        periods=PERIODS,
        error=error,
        chart=chart,
        threat_types=THREAT_TYPES,
        cache_seconds=CACHE_SECONDS[period],
    )


def cached_overview(period):
    """A period's figures from the app's cache (see `FiguresCache`)."""
    cache = current_app.extensions.setdefault("overview_cache", FiguresCache())
    return cache.figures_for(period)


class FiguresCache:
    """Each period's latest figures, worked out again in the background.

    Figures older than CACHE_SECONDS are still shown while a thread works out
    new ones, so only the first view of a period after a start waits for them.
    """

    def __init__(self):
        self.figures = {}
        self.refreshing = {}
        self.lock = threading.Lock()

    def figures_for(self, period):
        """The latest figures for `period`, starting a refresh when they are old."""
        with self.lock:
            figures = self.figures.get(period)
            old = figures is not None and (
                time.time() - figures.now > CACHE_SECONDS[period]
            )
            if old and period not in self.refreshing:
                worker = threading.Thread(
                    target=self.refresh, args=(period,), name=f"overview-{period}"
                )
                self.refreshing[period] = worker
                worker.start()
        if figures is None:
            figures = overview(period)
            with self.lock:
                self.figures[period] = figures
        return figures

    def refresh(self, period):
        """Work out one period's figures on this thread's own connection."""
        try:
            db.connect(reuse_if_open=True)
            figures = overview(period)
            with self.lock:
                self.figures[period] = figures
        except Exception:
            log.exception("overview figures for the %s not worked out", period)
        finally:
            db.close()
            with self.lock:
                self.refreshing.pop(period, None)
