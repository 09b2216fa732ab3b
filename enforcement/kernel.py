"""The kernel backend: one ipset per family and one rule per family that uses it.

Sets are driven with the `ipset` command in `ipset restore` batches; the chain
and its rule are written by a driver from enforcement/rules.py into the
xtables backend this host's `iptables` shows (see docs/enforcement.md).
Everything acts on the network namespace of the calling process.
"""

import logging
import queue
import re
import socket
import threading

from appliance.addresses import AddressError
from appliance.addresses import parse_ip
from enforcement import commands
from enforcement.plan import compare
from enforcement.plan import entry_text
from enforcement.plan import family_of
from enforcement.plan import fit
from enforcement.plan import wanted_state
from enforcement.rules import FAMILIES
from enforcement.rules import EnforcementError
from enforcement.rules import SetLookupDenied
from enforcement.rules import chain_rules
from enforcement.rules import rules_driver

log = logging.getLogger(__name__)

__all__ = ["EnforcementError", "KernelBackend"]

IPSET_FAMILY = {4: "inet", 6: "inet6"}
# peers per `ss -K` call when cutting connections
CUT_CHUNK = 100
# the lines of `ipset save` that name a set and that hold an entry
CREATE_LINE = re.compile(r"^create (\S+) ", re.MULTILINE)
# one set's header in `ipset list -t`: its name, then its entry count
SET_HEADER = re.compile(
    r"^Name: (\S+)$.*?^Number of entries: (\d+)$", re.MULTILINE | re.DOTALL
)
ADD_LINE = re.compile(r"^add (\S+) (\S+)(?: .*?timeout (\d+))?", re.MULTILINE)


class KernelBackend:
    """Makes the kernel's sets hold exactly the blocks it is given."""

    name = "kernel"
    dry_run = False

    def __init__(self, settings):
        """Rules and set names from the settings; nothing touches the kernel yet."""
        self.sets = {4: settings.set_v4, 6: settings.set_v6}
        self.set_size = settings.set_size
        self.rules = chain_rules(settings, self.sets)
        self.ports = self.rules[4].ports
        self.driver = rules_driver(settings, self.rules)
        # per family: whether the last check found the rule and its jump in
        # place; None until the first check
        self.rules_in_place = None
        # entries whose connections the cutting thread is to cut, once started
        self._to_cut = None
        self._lock = threading.RLock()

    def start_cutting(self):
        """Cut connections in a thread of their own from now on.

        Listing and killing sockets takes a few `ss` runs; the daemon's loop
        hands entries over and goes on with the next block meanwhile.
        """
        if self._to_cut is None:
            self._to_cut = queue.SimpleQueue()
            threading.Thread(target=self._cutting, name="cut", daemon=True).start()

    def _cutting(self):
        """The cutting thread: cut what was handed over, a gathered batch at a time."""
        while True:
            entries = list(self._to_cut.get())
            while not self._to_cut.empty():
                entries += self._to_cut.get()
            try:
                self.cut_connections(entries)
            except Exception:
                log.exception("cutting connections of %d entries failed", len(entries))

    def _cut(self, entries):
        """Cut connections from new entries: in the cutting thread, or now."""
        if not entries:
            return
        if self._to_cut is None:
            self.cut_connections(entries)
        else:
            self._to_cut.put(list(entries))

    def setup(self):
        """Create the sets, the chain, its rule and the jump where missing.

        Returns what had to be put back, in words; raises EnforcementError
        when a rule cannot be written.
        """
        with self._lock:
            repaired, errors, _denied = self._put_back()
            if errors:
                raise EnforcementError("; ".join(errors))
            return repaired

    def sync(self, desired, check_rules=True):
        """Make the sets hold exactly `desired` (entry -> seconds or None).

        `check_rules=False` skips reading the rules back and trusts the last
        check. A rule that cannot be put back (an unprivileged daemon cannot
        write one) does not stop the sets being synced: its family's entries
        are then not enforced, and `change.errors` says why.
        """
        with self._lock:
            held, present = self._read_sets()
            repaired = self._create_sets(present)
            errors, denied = [], False
            if check_rules:
                more, errors, denied = self._put_back_rules()
                repaired += more
            for what in repaired:
                log.warning("kernel drift repaired: %s was missing and is back", what)

            # a full set drops what ranks last, even an entry it holds already
            wanted, overflow = fit(desired, self.set_size)
            change = compare(held, wanted)
            change.overflow = overflow
            change.repaired = repaired
            change.errors = errors
            change.needs_setup = denied

            self._restore(self._change_batch(change))
            now_held = (held.keys() - set(change.removed)) | set(change.added)
            change.enforced = self._with_rule(now_held)
            self._report(change)
            self._cut(change.added)
            return change

    def apply(self, added, removed):
        """Add and remove just these entries, without reading the sets back.

        `added` maps entry -> seconds or None, `removed` lists entries. One
        `ipset restore -exist` batch: a new entry replaces an old one with its
        timeout, a missing one is not an error. Raises EnforcementError when
        the batch fails (a set missing or full): a full sync sorts that out.
        """
        with self._lock:
            wanted = wanted_state(added)
            change = compare({}, wanted)
            change.removed = sorted(
                {entry_text(e) for e in removed if valid(e)} - wanted.keys()
            )
            self._restore(self._change_batch(change))
            change.enforced = self._with_rule(change.added)
            self._report(change)
            self._cut(change.added)
            return change

    def rebuild(self, desired):
        """Load `desired` into fresh sets and swap them in, all at once."""
        with self._lock:
            repaired, errors, denied = self._put_back()
            for what in repaired:
                log.info("kernel: %s created", what)
            held, present = self._read_sets()
            wanted, overflow = fit(desired, self.set_size)
            change = compare(held, wanted)
            change.overflow = overflow
            change.errors = errors
            change.needs_setup = denied

            batch = []
            for family in FAMILIES:
                batch += self._fresh_set_batch(family, wanted, present)
            self._restore(batch)
            change.enforced = self._with_rule(wanted)
            log.info("kernel sets rebuilt with %d entries", len(wanted))
            self._report(change)
            self._cut(change.added)
            return change

    def matches(self, count):
        """A cheap check: sets and rules in place, holding `count` entries.

        Reads only the sets' headers (`ipset list -t`), so a reconcile pass
        over 100,000 entries costs milliseconds; a mismatch calls for a sync.
        """
        with self._lock:
            result = commands.run(["ipset", "list", "-t"])
            if result.returncode != 0:
                raise self._failure("ipset list -t", result)
            counts = {
                name: int(entries)
                for name, entries in SET_HEADER.findall(result.stdout)
                if name in self.sets.values()
            }
            if len(counts) != len(self.sets) or sum(counts.values()) != count:
                return False
            return all(self._check_rules().values())

    def enforced(self):
        """The entries the kernel enforces right now, in sender text form."""
        with self._lock:
            held, present = self._read_sets()
            if not set(self.sets.values()) <= present:
                return set()
            self._check_rules()
            return self._with_rule(held)

    def teardown(self):
        """Remove the jump, the chain and both sets."""
        with self._lock:
            for family in FAMILIES:
                self.driver.remove(family)
            _held, present = self._read_sets()
            swap_sets = {swap_name(name) for name in self.sets.values()}
            doomed = sorted((set(self.sets.values()) | swap_sets) & present)
            self._restore([f"destroy {name}" for name in doomed])

    def cut_connections(self, entries):
        """Cut established connections from `entries` to the protected ports.

        Best effort: lists established peers once, closes our side of the
        covered ones (`ss -K`, which resets the peer) and deletes their
        conntrack flows. Returns the peer addresses that were cut.
        """
        listing = entries and commands.best_effort(
            ["ss", "-Htn", "state", "established", *self._port_filter()]
        )
        if not listing:
            return []

        blocked = BlockedIndex(entries)
        victims = {text: ip for text, ip in peers_of(listing) if blocked.covers(ip)}
        addresses = sorted({str(ip) for ip in victims.values()})

        self._kill_sockets(sorted(victims))
        for address in addresses:
            family = ["-f", "ipv6"] if ":" in address else []
            argv = ["conntrack", "-D", *family, "-p", "tcp", "-s", address]
            commands.best_effort(argv, harmless="0 flow entries")
            log.info("%s: established connections cut", address)
        return addresses

    def _read_sets(self):
        """What our sets hold (entry -> timeout) and the names of all sets."""
        result = commands.run(["ipset", "save"])
        if result.returncode != 0:
            raise self._failure("ipset save", result)

        present = set(CREATE_LINE.findall(result.stdout))
        held = {}
        for name, text, timeout in ADD_LINE.findall(result.stdout):
            if name not in self.sets.values():
                continue
            try:
                held[entry_text(text)] = int(timeout or 0) or None
            except AddressError:
                log.warning("unreadable entry %s in set %s skipped", text, name)
        return held, present

    def _check_rules(self):
        """Read both rules back; remember and return which are in place."""
        self.rules_in_place = {f: self.driver.in_place(f) for f in FAMILIES}
        return self.rules_in_place

    def _put_back(self):
        """Create missing sets and rules: as `_put_back_rules`, sets included."""
        _held, present = self._read_sets()
        repaired = self._create_sets(present)
        more, errors, denied = self._put_back_rules()
        return repaired + more, errors, denied

    def _put_back_rules(self):
        """Write each family's rule where it is missing.

        Returns (what was put back, what could not be) in words, and whether
        a failure was iptables lacking CAP_NET_RAW, which only the privileged
        setup step can mend.
        """
        repaired, errors, denied = [], [], False
        for family, in_place in self._check_rules().items():
            if in_place:
                continue
            chain = self.rules[family].chain
            try:
                self.driver.install(family)
            except EnforcementError as exc:
                denied = denied or isinstance(exc, SetLookupDenied)
                errors.append(
                    f"IPv{family} rule of chain {chain} is missing and could not "
                    f"be put back: {exc}"
                )
                continue
            self.rules_in_place[family] = True
            repaired.append(f"IPv{family} rule of chain {chain}")
        return repaired, errors, denied

    def _with_rule(self, entries):
        """The entries whose family's rule the last check found in place."""
        in_place = self.rules_in_place or self._check_rules()
        return {e for e in entries if in_place[family_of(e)]}

    def _create_sets(self, present):
        """Create whichever of our two sets is missing, in one batch."""
        missing = [
            (family, name) for family, name in self.sets.items() if name not in present
        ]
        self._restore([self._create_line(name, family) for family, name in missing])
        return [f"set {name}" for _family, name in missing]

    def _create_line(self, name, family):
        """The ipset line that creates one family's set."""
        return (
            f"create {name} hash:net family {IPSET_FAMILY[family]} "
            f"timeout 0 maxelem {self.set_size}"
        )

    def _fresh_set_batch(self, family, wanted, present):
        """Lines that fill a fresh copy of one set and swap it in."""
        name = self.sets[family]
        fresh = swap_name(name)
        batch = [f"destroy {fresh}"] if fresh in present else []
        batch.append(self._create_line(fresh, family))
        batch += [
            f"add {fresh} {entry} timeout {timeout or 0}"
            for entry, timeout in wanted.items()
            if family_of(entry) == family
        ]
        batch += [f"swap {fresh} {name}", f"destroy {fresh}"]
        return batch

    def _change_batch(self, change):
        """The ipset lines for one Change: removals first, then adds."""
        batch = [f"del {self.sets[family_of(e)]} {e}" for e in change.removed]
        for entry in change.added + change.retimed:
            timeout = change.timeouts[entry] or 0
            batch.append(f"add {self.sets[family_of(entry)]} {entry} timeout {timeout}")
        return batch

    def _restore(self, batch):
        """Apply ipset lines in one `ipset restore -exist` call."""
        if not batch:
            return
        result = commands.run(["ipset", "restore", "-exist"], "\n".join(batch) + "\n")
        if result.returncode == 0:
            return

        command = f"ipset restore -exist (a batch of {len(batch)} lines)"
        failed = re.search(r"Error in line (\d+)", result.stderr)
        if failed and 0 < int(failed.group(1)) <= len(batch):
            command += f", failing at `{batch[int(failed.group(1)) - 1]}`"
        raise self._failure(command, result)

    def _kill_sockets(self, peer_texts):
        """Close our side of every established connection from these peers."""
        for start in range(0, len(peer_texts), CUT_CHUNK):
            chunk = peer_texts[start : start + CUT_CHUNK]
            peers = " or ".join(
                f"dst [{text}]" if ":" in text else f"dst {text}" for text in chunk
            )
            expression = " and ".join([*self._port_filter(), f"( {peers} )"])
            commands.best_effort(
                ["ss", "-K", "-Htn", "state", "established", expression]
            )

    def _port_filter(self):
        """The ss expression for the protected ports, or none for all ports."""
        if not self.ports:
            return []
        ports = " or ".join(f"sport = :{port}" for port in self.ports)
        return [f"( {ports} )"]

    def _report(self, change):
        """Log what a sync did: a summary at INFO, each entry at DEBUG.

        Blocks left out of a full set are an error naming the first few and
        the setting to raise.
        """
        if change.overflow:
            log.error(
                "kernel sets full (maxelem %d): %d blocks NOT enforced, first %s; "
                "raise enforcement.set_size",
                self.set_size,
                len(change.overflow),
                ", ".join(change.overflow[:5]),
            )
        if change:
            log.info("kernel sets: %s", change.summary())
        for line in change.lines():
            log.debug("kernel sets: %s", line)

    @staticmethod
    def _failure(command, result):
        """Log a failed command in full and make the error to raise."""
        detail = result.stderr.strip() or f"exit {result.returncode}"
        log.error("kernel change failed: `%s`: %s", command, detail)
        return EnforcementError(f"`{command}` failed: {detail}")


class BlockedIndex:
    """Blocked networks as integers per (family, prefix length), to test peers."""

    def __init__(self, entries):
        """Index entries in sender text form."""
        self.networks = {}
        for entry in entries:
            host, _slash, prefix = entry.partition("/")
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            packed = socket.inet_pton(family, host)
            length = int(prefix) if prefix else len(packed) * 8
            key = (len(packed) * 8, length)
            self.networks.setdefault(key, set()).add(int.from_bytes(packed, "big"))

    def covers(self, address):
        """Whether any indexed network holds this address."""
        width = address.max_prefixlen
        for (family_width, length), starts in self.networks.items():
            if family_width != width:
                continue
            host_bits = width - length
            if (int(address) >> host_bits) << host_bits in starts:
                return True
        return False


def peers_of(listing):
    """(text as ss shows it, address) for each peer in `ss -Htn` output."""
    for line in listing.splitlines():
        words = line.split()
        if len(words) < 4:
            continue
        text = words[3].rpartition(":")[0].strip("[]").partition("%")[0]
        try:
            yield text, parse_ip(text)
        except AddressError:
            continue


def valid(text):
    """Whether an entry's text is one ipset can hold (logged when not)."""
    try:
        entry_text(text)
    except AddressError as exc:
        log.error("%s not enforced: %s", text, exc)
        return False
    return True


def swap_name(name):
    """The name of the fresh set a rebuild fills before swapping it in."""
    return f"{name[:26]}-swap"
