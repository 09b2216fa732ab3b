"""The Suspicious IP log query that the console and the CLI share (SPEC §4).

Date-times without an offset are read as UTC, the time base of every time
stamp in the database; the console says so next to its date fields.
"""

import ipaddress
import math
import re
import time
from dataclasses import dataclass
from dataclasses import field
from dataclasses import replace
from datetime import UTC
from datetime import datetime
from datetime import timedelta

from appliance import addresses
from appliance.config import THREAT_TYPES
from appliance.models import Block
from appliance.models import SuspiciousEntry

PER_PAGE_CHOICES = (10, 25, 50, 100)
ORDERS = ("asc", "desc")
SORT_COLUMNS = {
    "time": SuspiciousEntry.last_seen,
    "type": SuspiciousEntry.threat_type,
    "ip": SuspiciousEntry.sender_key,
    "violations": SuspiciousEntry.violations,
    "messages": SuspiciousEntry.messages,
    "rate": SuspiciousEntry.rate,
    "status": SuspiciousEntry.status,
}
# the direction a column sorts in when its title is first clicked
FIRST_ORDER = {
    "time": "desc",
    "type": "asc",
    "ip": "asc",
    "violations": "desc",
    "messages": "desc",
    "rate": "desc",
    "status": "asc",
}
DATE_TIME = re.compile(
    r"^\d{4}-\d{2}-\d{2}"
    r"(?:[T ](?P<minute>\d{2}:\d{2})(?P<second>:\d{2}(?:\.\d{1,6})?)?)?"
    r"(?:Z|[+-]\d{2}:?\d{2})?$",
    re.IGNORECASE,
)
TRUE_WORDS = ("1", "on", "yes", "true")


@dataclass(frozen=True)
class SuspiciousPage:
    """One page of the log: its entries, how many match in all, how many pages."""

    rows: list
    total: int
    pages: int
    page: int


@dataclass(frozen=True)
class SuspiciousQuery:
    """Filters, sort and page of the Suspicious IP log, as the URL carries them."""

    types: tuple[str, ...] = THREAT_TYPES
    since: str = ""
    until: str = ""
    ip: str = ""
    domains: bool = False
    per_page: int = 25
    sort: str = "time"
    order: str = "desc"
    page: int = 1
    ipv6_prefix: int = 64
    since_ts: float | None = field(default=None, repr=False)
    until_ts: float | None = field(default=None, repr=False)
    network: object = field(default=None, repr=False)

    @classmethod
    def from_args(cls, args, ipv6_prefix=64):
        """Read request args; returns (query, {field: message}) and never raises.

        A field with a bad value keeps its default in the query (text fields
        keep the text as typed, so the form can show it again).
        """
        values = {"ipv6_prefix": ipv6_prefix}
        errors = {}

        types = [t.strip().lower() for t in _list(args, "type") if t.strip()]
        unknown = [t for t in types if t not in THREAT_TYPES]
        if unknown:
            errors["type"] = (
                f"{unknown[0]!r} is not a threat type; "
                f"choose from {', '.join(THREAT_TYPES)}"
            )
        elif types:
            values["types"] = tuple(t for t in THREAT_TYPES if t in types)

        for name, arg in (("since", "from"), ("until", "to")):
            text = _text(args, arg)
            values[name] = text
            if not text:
                continue
            try:
                start, span = parse_time(text)
            except ValueError as exc:
                errors[arg] = str(exc)
                continue
            values[f"{name}_ts"] = start if name == "since" else start + span
        since_ts, until_ts = values.get("since_ts"), values.get("until_ts")
        if since_ts is not None and until_ts is not None and since_ts >= until_ts:
            errors["to"] = "the 'to' date-time is before the 'from' date-time"

        values["ip"] = _text(args, "ip")
        if values["ip"]:
            try:
                values["network"] = _search_network(values["ip"])
            except addresses.AddressError as exc:
                errors["ip"] = str(exc)

        values["domains"] = _text(args, "domains").lower() in TRUE_WORDS

        per_page = _text(args, "per_page")
        if per_page:
            if per_page in {str(n) for n in PER_PAGE_CHOICES}:
                values["per_page"] = int(per_page)
            else:
                choices = ", ".join(str(n) for n in PER_PAGE_CHOICES)
                errors["per_page"] = f"logs per page must be one of {choices}"

        sort = _text(args, "sort").lower()
        if sort in SORT_COLUMNS:
            values["sort"] = sort
            values["order"] = FIRST_ORDER[sort]
        elif sort:
            errors["sort"] = (
                f"{sort!r} is not a column to sort by; "
                f"choose from {', '.join(SORT_COLUMNS)}"
            )

        order = _text(args, "order").lower()
        if order in ORDERS:
            values["order"] = order
        elif order:
            errors["order"] = "the sort order is asc or desc"

        page = _text(args, "page")
        if page:
            if page.isascii() and page.isdigit() and len(page) <= 9 and int(page) >= 1:
                values["page"] = int(page)
            else:
                errors["page"] = "the page is a whole number from 1"

        return cls(**values), errors

    def to_args(self, **changes):
        """URL args that rebuild this query, with `changes` (field names) applied."""
        query = replace(self, **changes) if changes else self
        args = {}
        if set(query.types) != set(THREAT_TYPES):
            args["type"] = list(query.types)
        if query.since:
            args["from"] = query.since
        if query.until:
            args["to"] = query.until
        if query.ip:
            args["ip"] = query.ip
        if query.domains:
            args["domains"] = "1"
        args["per_page"] = str(query.per_page)
        args["sort"] = query.sort
        args["order"] = query.order
        if query.page > 1:
            args["page"] = str(query.page)
        return args

    def select(self):
        """The entries this query matches, sorted, not yet paged."""
        conditions = []
        if set(self.types) != set(THREAT_TYPES):
            conditions.append(SuspiciousEntry.threat_type.in_(list(self.types)))
        if self.since_ts is not None:
            conditions.append(SuspiciousEntry.last_seen >= self.since_ts)
        if self.until_ts is not None:
            conditions.append(SuspiciousEntry.first_seen < self.until_ts)
        if self.network is not None:
            first, last = sender_key_range(self.network, self.ipv6_prefix)
            conditions.append(SuspiciousEntry.sender_key.between(first, last))

        query = SuspiciousEntry.select()
        if conditions:
            query = query.where(*conditions)
        return query.order_by(*self._ordering())

    def run(self):
        """The page this query asks for; a page past the end shows the last one."""
        query = self.select()
        total = query.order_by().count()
        pages = max(1, math.ceil(total / self.per_page))
        page = min(self.page, pages)
        rows = list(query.paginate(page, self.per_page))
        return SuspiciousPage(rows=rows, total=total, pages=pages, page=page)

    def rows(self, limit=None):
        """Every matching entry in sort order, or the first `limit` of them."""
        query = self.select()
        if limit is not None:
            query = query.limit(limit)
        return list(query)

    def _ordering(self):
        """ORDER BY terms: the column, then newest first, then the row id."""
        column = SORT_COLUMNS[self.sort]
        terms = [column]
        if self.sort != "time":
            terms.append(SuspiciousEntry.last_seen)
        terms.append(SuspiciousEntry.id)
        if self.order == "desc":
            return [term.desc() for term in terms]
        return [term.asc() for term in terms]


def parse_time(text):
    """An ISO date or date-time as (epoch start, seconds it spans).

    Read as UTC unless it carries an offset. The span is the precision the
    text names: a day, a minute or a second, so 'to 10:00' covers 10:00:59.
    """
    text = text.strip()
    match = DATE_TIME.match(text)
    try:
        moment = datetime.fromisoformat(text) if match else None
    except ValueError:
        moment = None
    if moment is None:
        raise ValueError(f"{text!r} is not a date-time such as 2026-12-04T10:00")
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    if match.group("second"):
        span = timedelta(seconds=1)
    elif match.group("minute"):
        span = timedelta(minutes=1)
    else:
        span = timedelta(days=1)
    return moment.timestamp(), span.total_seconds()


def sender_key_range(network, ipv6_prefix=64):
    """The sender_key range holding every sender that shares an address with it.

    IPv6 senders are stored per /64 (the prefix setting) under the key of the
    network address, so a search inside one /64 widens to that whole /64.
    """
    if network.version == 6 and network.prefixlen > ipv6_prefix:
        network = network.supernet(new_prefix=ipv6_prefix)
    return addresses.key_range(network)


def active_blocks_for(rows, widest_v4=16, widest_v6=32, now=None):
    """The block in force now over each row's sender, by entry id.

    A block may not be wider than the widest-range settings, so the search for
    one covering a sender only looks at blocks starting in that wider range.
    """
    now = time.time() if now is None else now
    widest = {4: widest_v4, 6: widest_v6}
    by_sender = {}
    found = {}
    for entry in rows:
        if entry.sender not in by_sender:
            by_sender[entry.sender] = _block_over(entry.sender, widest, now)
        if by_sender[entry.sender] is not None:
            found[entry.id] = by_sender[entry.sender]
    return found


def status_now(entry, block):
    """An entry's status as of now: blocked, block ended, or what it recorded."""
    if block is not None:
        return "blocked"
    if entry.status == "blocked":
        return "block ended"
    return entry.status


def _block_over(sender, widest, now):
    """The active block covering one sender network, if any."""
    try:
        network = addresses.parse_network(sender)
    except addresses.AddressError:
        return None
    outer = network.supernet(new_prefix=min(widest[network.version], network.prefixlen))
    first, last = addresses.key_range(network)
    floor = addresses.key_of(outer.network_address)
    return (
        Block.select()
        .where(
            Block.lifted_at.is_null()
            & (Block.expires_at.is_null() | (Block.expires_at > now))
            & Block.key_first.between(floor, first)
            & (Block.key_last >= last)
        )
        .order_by(Block.key_first.desc())
        .first()
    )


def _search_network(text):
    """The network an IP search names; a CIDR with host bits set gets a hint."""
    try:
        return addresses.parse_network(text)
    except addresses.AddressError as exc:
        try:
            loose = ipaddress.ip_network(text.strip(), strict=False)
        except ValueError:
            raise exc from None
        raise addresses.AddressError(
            f"{text.strip()} has host bits set; did you mean {loose}?"
        ) from None


def _list(args, name):
    """Every value of an arg, from a MultiDict or a plain mapping."""
    if hasattr(args, "getlist"):
        return [str(v) for v in args.getlist(name)]
    value = args.get(name)
    if value is None:
        return []
    if isinstance(value, list | tuple):
        return [str(v) for v in value]
    return [str(value)]


def _text(args, name):
    """The first value of an arg, stripped; '' when absent."""
    values = _list(args, name)
    return values[0].strip() if values else ""
