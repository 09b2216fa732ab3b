"""The Suspicious IP log query that the console and the CLI share (SPEC §4).

Date-times without an offset are read as UTC, the time base of every time
stamp in the database; the console says so next to its date fields.
"""

import ipaddress
import math
import time
from dataclasses import dataclass
from dataclasses import field
from dataclasses import replace

from peewee import SQL
from peewee import NodeList
from peewee import fn

from appliance import addresses
from appliance.config import THREAT_TYPES
from appliance.models import Block
from appliance.models import SuspiciousEntry
from appliance.timefmt import date_range

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
TRUE_WORDS = ("1", "on", "yes", "true")
# matches are counted exactly up to this many and paged through as far; past
# it the page says "10,000+" (counting a million matches takes too long)
MATCH_CAP = 10_000
# reading one entry from the table costs about as much as walking this many
# index entries; it decides between walking the sort's index and sorting
LOOKUP_COST = 25
# columns of a few values: a second sort column walks its index once per value
FEW_VALUES = ("type", "status")
# senders looked up in one query for their blocks: SQLite nests each OR'd
# term one level deeper (1,000 levels at most) and binds three values a term
SENDERS_PER_QUERY = 250


@dataclass(frozen=True)
class SuspiciousPage:
    """One page of the log: its entries, how many match, how many pages.

    `total` is exact unless `more` is set: then more than `total` match. Pages
    reach the first MATCH_CAP entries in the chosen order.
    """

    rows: list
    total: int
    pages: int
    page: int
    more: bool = False

    @property
    def reach(self):
        """How many entries, in the chosen order, the pages reach at most."""
        return MATCH_CAP

    @property
    def bounded(self):
        """Whether matches lie past the last page (narrow or reverse to see them)."""
        return self.more or self.total > MATCH_CAP


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
    then: str = ""
    then_order: str = "desc"
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

        values["since"], values["until"] = _text(args, "from"), _text(args, "to")
        since_ts, until_ts, problems = date_range(values["since"], values["until"])
        values.update(since_ts=since_ts, until_ts=until_ts)
        errors.update(problems)

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

        for column, order in (("sort", "order"), ("then", "then_order")):
            _read_sort(args, column, order, values, errors)
        if values.get("then") == values.get("sort", "time"):
            values.pop("then", None)

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
        if query.then and query.then != query.sort:
            args["then"] = query.then
            args["then_order"] = query.then_order
        if query.page > 1:
            args["page"] = str(query.page)
        return args

    def select(self):
        """The entries this query matches, sorted, not yet paged."""
        return _entries(self._conditions(), self._ordering())

    def count(self):
        """(matches, more): exact up to MATCH_CAP; `more` when there are more."""
        conditions = self._conditions()
        if not conditions:
            return SuspiciousEntry.select(fn.COUNT(SQL("*"))).scalar(), False
        capped = SuspiciousEntry.select(SuspiciousEntry.id).where(*conditions)
        found = capped.limit(MATCH_CAP + 1).count()
        return min(found, MATCH_CAP), found > MATCH_CAP

    def run(self):
        """The page this query asks for; a page past the last shows the last one."""
        total, more = self.count()
        pages = max(1, math.ceil(min(total, MATCH_CAP) / self.per_page))
        page = min(self.page, pages)
        rows = self._rows_from((page - 1) * self.per_page, None if more else total)
        return SuspiciousPage(rows=rows, total=total, pages=pages, page=page, more=more)

    def rows(self, limit=None):
        """Every matching entry in sort order, or the first `limit` of them."""
        query = self.select()
        if limit is not None:
            query = query.limit(limit)
        return list(query)

    def _rows_from(self, offset, matches):
        """One page of rows from `offset`, by the cheapest of three plans.

        `matches` is the exact match count, None when over MATCH_CAP. Every
        sort index also holds the filter columns but the sender key, so a walk
        along it reads the table only for the rows it returns.
        """
        if matches is not None and self._sorting_is_cheaper(offset, matches):
            ordering = self._ordering(indexed=False)
            query = _entries(self._conditions(), ordering)
        elif self.then and self.sort in FEW_VALUES:
            return self._rows_by_value(offset)
        else:
            query = _entries(self._conditions(walk=self.sort), self._ordering())
        return list(query.offset(offset).limit(self.per_page))

    def _sorting_is_cheaper(self, offset, matches):
        """Whether reading every match and sorting beats walking the sort index."""
        if self.network is not None:
            # sender keys are in no sort index: a walk would read the table
            return True
        entries = SuspiciousEntry.select(fn.MAX(SuspiciousEntry.id)).scalar() or 0
        walked = min(entries, (offset + self.per_page) * entries / max(matches, 1))
        return matches * LOOKUP_COST < walked

    def _rows_by_value(self, offset):
        """A page sorted by type or status, then another column: one walk per value.

        Each value's entries come from the second column's index; a value
        whose entries all lie before `offset` is only counted.
        """
        rows = []
        first = SORT_COLUMNS[self.sort]
        for value in self._values_of_first_column():
            if len(rows) == self.per_page:
                break
            if offset:
                conditions = [*self._conditions(walk=self.sort), first == value]
                counted = SuspiciousEntry.select(SuspiciousEntry.id).where(*conditions)
                in_group = counted.limit(offset + 1).count()
                if in_group <= offset:
                    offset -= in_group
                    continue
            conditions = [*self._conditions(walk=self.then), _unindexed(first) == value]
            query = _entries(conditions, self._ordering(first=False))
            rows.extend(query.offset(offset).limit(self.per_page - len(rows)))
            offset = 0
        return rows

    def _values_of_first_column(self):
        """The values of the first sort column, in its sort order."""
        if self.sort == "type":
            values = sorted(self.types)
        else:
            values = _distinct_statuses()
        return values[::-1] if self.order == "desc" else values

    def _conditions(self, walk=None):
        """WHERE terms of the filters; with `walk`, only that sort column's index
        may serve them, so SQLite walks it instead of choosing another."""

        def column(key, field):
            return field if walk in (None, key) else _unindexed(field)

        conditions = []
        if set(self.types) != set(THREAT_TYPES):
            types = list(self.types)
            conditions.append(column("type", SuspiciousEntry.threat_type).in_(types))
        if self.since_ts is not None:
            # every sort index holds last_seen second: SQLite skip-scans it there
            conditions.append(SuspiciousEntry.last_seen >= self.since_ts)
        if self.until_ts is not None:
            conditions.append(column("", SuspiciousEntry.first_seen) < self.until_ts)
        if self.network is not None:
            first, last = sender_key_range(self.network, self.ipv6_prefix)
            key = column("ip", SuspiciousEntry.sender_key)
            conditions.append(key.between(first, last))
        return conditions

    def _ordering(self, indexed=True, first=True):
        """ORDER BY terms: the column(s), then last seen, then the row id.

        Ties follow the last sort column's direction, as the indexes hold them
        (column, last_seen, id). `indexed=False` keeps every index from serving
        the order (the rows are sorted instead); `first=False` leaves out the
        first column (each of its values is walked on its own).
        """
        keys = [(self.sort, self.order)] if first else []
        if self.then:
            keys.append((self.then, self.then_order))
        tie = keys[-1][1]
        if "time" not in (key for key, _order in keys):
            keys.append(("time", tie))
        terms = [(SORT_COLUMNS[key], order) for key, order in keys]
        terms.append((SuspiciousEntry.id, tie))
        if not indexed:
            terms = [(_unindexed(term), order) for term, order in terms]
        return [term.desc() if order == "desc" else term.asc() for term, order in terms]


def _entries(conditions, ordering):
    """Entries matching every condition, in that order."""
    query = SuspiciousEntry.select()
    if conditions:
        query = query.where(*conditions)
    return query.order_by(*ordering)


def _unindexed(field):
    """The same value as an expression no index serves (text || '', number + 0)."""
    if field.field_type in ("VARCHAR", "TEXT"):
        return field.concat("")
    return field + 0


def _distinct_statuses():
    """Every status in the log, each found with one seek along its index."""
    status = SuspiciousEntry.status
    found = []
    value = SuspiciousEntry.select(fn.MIN(status)).scalar()
    while value is not None:
        found.append(value)
        value = SuspiciousEntry.select(fn.MIN(status)).where(status > value).scalar()
    return found


def _read_sort(args, column, order, values, errors):
    """Read a sort column arg and its direction arg into `values` or `errors`."""
    key = _text(args, column).lower()
    if key in SORT_COLUMNS:
        values[column] = key
        values[order] = FIRST_ORDER[key]
    elif key:
        errors[column] = (
            f"{key!r} is not a column to sort by; choose from {', '.join(SORT_COLUMNS)}"
        )

    direction = _text(args, order).lower()
    if direction in ORDERS:
        values[order] = direction
    elif direction:
        errors[order] = "the sort order is asc or desc"


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
    One query asks for up to SENDERS_PER_QUERY senders at once (a console
    page in one); more senders take one query per that many.
    """
    now = time.time() if now is None else now
    widest = {4: widest_v4, 6: widest_v6}
    ranges = {}
    for entry in rows:
        if entry.sender not in ranges:
            ranges[entry.sender] = _search_keys(entry.sender, widest)
    wanted = [(sender, keys) for sender, keys in ranges.items() if keys is not None]

    by_sender = {}
    for start in range(0, len(wanted), SENDERS_PER_QUERY):
        chunk = dict(wanted[start : start + SENDERS_PER_QUERY])
        by_sender.update(_covering_blocks(chunk, now))
    return {
        entry.id: by_sender[entry.sender] for entry in rows if entry.sender in by_sender
    }


def _covering_blocks(ranges, now):
    """{sender: the narrowest block in force over it} for (floor, first, last) keys."""
    near = [
        Block.key_first.between(floor, first) & (Block.key_last >= last)
        for floor, first, last in ranges.values()
    ]
    candidates = Block.select().where(
        # the key ranges are the narrow part: keep SQLite on their index
        _unindexed(Block.lifted_at).is_null()
        & (Block.expires_at.is_null() | (Block.expires_at > now))
        & NodeList(near, glue=" OR ", parens=True)
    )
    candidates = sorted(candidates, key=lambda block: block.key_first, reverse=True)

    found = {}
    for sender, (floor, first, last) in ranges.items():
        block = next(
            (
                block
                for block in candidates
                if floor <= block.key_first <= first and block.key_last >= last
            ),
            None,
        )
        if block is not None:
            found[sender] = block
    return found


def status_now(entry, block):
    """An entry's status as of now: blocked, block ended, or what it recorded."""
    if block is not None:
        return "blocked"
    if entry.status == "blocked":
        return "block ended"
    return entry.status


def _search_keys(sender, widest):
    """(floor, first, last) keys where a block over a sender network must lie."""
    try:
        network = addresses.parse_network(sender)
    except addresses.AddressError:
        return None
    outer = network.supernet(new_prefix=min(widest[network.version], network.prefixlen))
    first, last = addresses.key_range(network)
    return addresses.key_of(outer.network_address), first, last


def _search_network(text):
    """The network an IP search names; a CIDR with host bits set gets a hint."""
    try:
        return addresses.parse_network(text)
    except addresses.AddressError as exc:
        if "/" not in text or "%" in text:
            # a single address has no host bits to clear; a zone id no sender has
            raise
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
