"""APScheduler jobs: lift each temporary block at its end time, re-resolve names."""

import logging
import threading
import time
from datetime import UTC
from datetime import datetime

from apscheduler.schedulers.background import BackgroundScheduler

from appliance import lists
from appliance import service
from appliance.models import Block
from appliance.models import db
from appliance.resolve import NameResolver

log = logging.getLogger(__name__)
# one INFO line per job added would be 100,000 lines at a start with as many
# temporary blocks, and each run of a job two more; each lift is in the
# sender filtering log
logging.getLogger("apscheduler.scheduler").setLevel(logging.WARNING)
logging.getLogger("apscheduler.executors").setLevel(logging.WARNING)


class BlockExpiry:
    """One date job per temporary block; a lifted block wakes the enforcer."""

    def __init__(self, on_lift):
        self.on_lift = on_lift
        self.scheduler = BackgroundScheduler(timezone=UTC)
        # block id -> the end time its job was scheduled for
        self.scheduled = {}
        self.lock = threading.Lock()

    def start(self):
        """Start the scheduler thread; `refresh` gives it the blocks."""
        self.scheduler.start()

    def refresh(self):
        """Schedule every active temporary block not scheduled yet."""
        lifted = service.expire_due()
        if lifted:
            self.on_lift(lifted)
        active = Block.select(Block.id, Block.expires_at).where(
            Block.lifted_at.is_null() & Block.expires_at.is_null(False)
        )
        with self.lock:
            for block in active:
                # a block extended since it was scheduled gets its job replaced
                if self.scheduled.get(block.id) == block.expires_at:
                    continue
                self.scheduler.add_job(
                    self._lift,
                    "date",
                    run_date=datetime.fromtimestamp(block.expires_at, UTC),
                    args=[block.id],
                    id=f"block-{block.id}",
                    replace_existing=True,
                    misfire_grace_time=None,
                )
                self.scheduled[block.id] = block.expires_at

    def _lift(self, block_id):
        """Lift one block when its time is up (runs in the scheduler thread)."""
        with self.lock:
            self.scheduled.pop(block_id, None)
        try:
            db.connect(reuse_if_open=True)
            block = Block.get_or_none(Block.id == block_id)
            if block is None or block.lifted_at is not None:
                return
            # made permanent or extended since: refresh() schedules the new end
            if block.expires_at is None or block.expires_at > time.time():
                return
            lifted = service.lift(
                Block.id == block_id,
                actor="scheduler",
                reason="expired",
                now=block.expires_at,
            )
        finally:
            db.close()
        if lifted:
            self.on_lift(lifted)

    def stop(self):
        """Stop the scheduler thread."""
        self.scheduler.shutdown(wait=False)


def schedule_reresolve(scheduler, settings, on_change):
    """Look the listed domain names up again every `dns.reresolve_minutes`."""
    names = NameResolver(settings.nameservers, settings.dns_timeout)

    def reresolve():
        """One pass over the names (runs in the scheduler thread)."""
        changed = 0
        try:
            db.connect(reuse_if_open=True)
            changed = lists.reresolve(names)
        except Exception:
            log.exception("re-resolving the listed domain names failed")
        finally:
            db.close()
        if changed:
            on_change(changed)

    scheduler.add_job(
        reresolve,
        "interval",
        minutes=settings.reresolve_minutes,
        id="reresolve-names",
        replace_existing=True,
        coalesce=True,
        max_instances=1,
    )
