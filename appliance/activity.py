"""The sender filtering log (SPEC §5): when each block started and ended and why,
and every recorded action (who, what, when, from where), by IP and date.

Both lists are newest first and read through indexes: blocks by `created_at`
and their key range, actions by `ts` and their target's key range.
"""

import math
from dataclasses import dataclass
from dataclasses import field
from dataclasses import replace

from appliance import addresses
from appliance.models import AuditEntry
from appliance.models import Block
from appliance.timefmt import date_range

VIEWS = ("blocks", "actions")
PER_PAGE_CHOICES = (25, 50, 100)


@dataclass(frozen=True)
class ActivityPage:
    """One page of either list: its rows, how many match in all, how many pages."""

    rows: list
    total: int
    pages: int
    page: int


@dataclass(frozen=True)
class ActivityQuery:
    """The list shown, its IP and date filters and its page, as the URL carries them."""

    view: str = "blocks"
    ip: str = ""
    since: str = ""
    until: str = ""
    per_page: int = 50
    page: int = 1
    since_ts: float | None = field(default=None, repr=False)
    until_ts: float | None = field(default=None, repr=False)
    network: object = field(default=None, repr=False)

    @classmethod
    def from_args(cls, args):
        """Read request args; returns (query, {arg: message}) and never raises."""
        values = {}
        errors = {}

        view = args.get("view", "").strip()
        if view in VIEWS:
            values["view"] = view
        elif view:
            errors["view"] = f"the list is one of {', '.join(VIEWS)}"

        values["ip"] = args.get("ip", "").strip()
        if values["ip"]:
            try:
                values["network"] = addresses.parse_network(values["ip"])
            except addresses.AddressError as exc:
                errors["ip"] = str(exc)

        values["since"] = args.get("from", "").strip()
        values["until"] = args.get("to", "").strip()
        since_ts, until_ts, problems = date_range(values["since"], values["until"])
        values.update(since_ts=since_ts, until_ts=until_ts)
        errors.update(problems)

        per_page = args.get("per_page", "").strip()
        if per_page in {str(n) for n in PER_PAGE_CHOICES}:
            values["per_page"] = int(per_page)
        elif per_page:
            choices = ", ".join(str(n) for n in PER_PAGE_CHOICES)
            errors["per_page"] = f"rows per page must be one of {choices}"

        page = args.get("page", "").strip()
        if page.isascii() and page.isdigit() and len(page) <= 9 and int(page) >= 1:
            values["page"] = int(page)
        elif page:
            errors["page"] = "the page is a whole number from 1"

        return cls(**values), errors

    def to_args(self, **changes):
        """URL args that rebuild this query with `changes`; defaults left out."""
        query = replace(self, **changes) if changes else self
        args = {
            "view": query.view,
            "ip": query.ip,
            "from": query.since,
            "to": query.until,
            "per_page": query.per_page if query.per_page != 50 else "",
            "page": query.page if query.page != 1 else "",
        }
        return {name: value for name, value in args.items() if value != ""}

    def run(self, widest_v4=16, widest_v6=32):
        """The page asked for; a page past the end shows the last one."""
        if self.view == "blocks":
            select = self.blocks(widest_v4, widest_v6)
        else:
            select = self.actions(widest_v4, widest_v6)
        total = select.count()
        pages = max(1, math.ceil(total / self.per_page))
        page = min(self.page, pages)
        rows = list(select.paginate(page, self.per_page))
        return ActivityPage(rows=rows, total=total, pages=pages, page=page)

    def blocks(self, widest_v4, widest_v6):
        """Blocks whose life overlaps the dates and whose range meets the IP."""
        condition = True
        if self.network is not None:
            condition &= overlapping(Block, self.network, widest_v4, widest_v6)
        if self.until_ts is not None:
            condition &= Block.created_at < self.until_ts
        if self.since_ts is not None:
            # still in force, lifted after `since`, or (not yet marked) expired after
            condition &= (Block.lifted_at >= self.since_ts) | (
                Block.lifted_at.is_null()
                & (Block.expires_at.is_null() | (Block.expires_at >= self.since_ts))
            )
        return (
            Block.select()
            .where(condition)
            .order_by(Block.created_at.desc(), Block.id.desc())
        )

    def actions(self, widest_v4, widest_v6):
        """Recorded actions within the dates whose target meets the IP."""
        condition = True
        if self.network is not None:
            condition &= overlapping(AuditEntry, self.network, widest_v4, widest_v6)
        if self.since_ts is not None:
            condition &= AuditEntry.ts >= self.since_ts
        if self.until_ts is not None:
            condition &= AuditEntry.ts < self.until_ts
        return (
            AuditEntry.select()
            .where(condition)
            .order_by(AuditEntry.ts.desc(), AuditEntry.id.desc())
        )


def overlapping(model, network, widest_v4, widest_v6):
    """Rows of `model` whose key range shares an address with `network`.

    Nothing wider than the widest-range settings is blocked or approved, so a
    row covering `network` starts within that wider range: the index on
    key_first is read from there, not from the start.
    """
    widest = widest_v4 if network.version == 4 else widest_v6
    outer = network.supernet(new_prefix=min(widest, network.prefixlen))
    first, last = addresses.key_range(network)
    floor = addresses.key_of(outer.network_address)
    return model.key_first.between(floor, last) & (model.key_last >= first)


def block_end(block, now):
    """When a block ended (or ends) and why: (epoch or None, reason text)."""
    if block.lifted_at is not None:
        return block.lifted_at, block.lift_reason or "lifted"
    if block.expires_at is not None and block.expires_at <= now:
        return block.expires_at, "expired"
    return None, ""
