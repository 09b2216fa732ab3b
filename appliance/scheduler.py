"""APScheduler jobs that lift each temporary block at its end time."""

import logging
import threading
from datetime import UTC
from datetime import datetime

from apscheduler.schedulers.background import BackgroundScheduler

from appliance import service
from appliance.models import Block
from appliance.models import db

log = logging.getLogger(__name__)


class BlockExpiry:
    """One date job per temporary block; a lifted block wakes the enforcer."""

    def __init__(self, on_lift):
        self.on_lift = on_lift
        self.scheduler = BackgroundScheduler(timezone=UTC)
        self.scheduled = set()
        self.lock = threading.Lock()

    def start(self):
        """Start the scheduler thread and lift blocks already overdue."""
        self.scheduler.start()
        self.refresh()

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
                if block.id in self.scheduled:
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
                self.scheduled.add(block.id)

    def _lift(self, block_id):
        """Lift one block when its time is up (runs in the scheduler thread)."""
        with self.lock:
            self.scheduled.discard(block_id)
        try:
            db.connect(reuse_if_open=True)
            block = Block.get_or_none(Block.id == block_id)
            if block is None or block.lifted_at is not None:
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
