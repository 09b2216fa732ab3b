"""The kernel backend: one ipset per family and one rule per family that uses it.

Sets are driven with the `ipset` command in `ipset restore` batches; the chain
and its rule live in the legacy xtables filter table, driven with
python-iptables (see docs/enforcement.md for why legacy). Everything acts on
the network namespace of the calling process.
"""

import logging
import re
import shlex
import socket
import subprocess
import threading
from contextlib import contextmanager
from dataclasses import dataclass

import iptc

from appliance.addresses import AddressError
from appliance.addresses import parse_ip
from enforcement.plan import compare
from enforcement.plan import entry_text
from enforcement.plan import family_of
from enforcement.plan import plan
from enforcement.plan import wanted_state

log = logging.getLogger(__name__)

FAMILIES = (4, 6)
IPSET_FAMILY = {4: "inet", 6: "inet6"}
# the command that shows what python-iptables wrote, quoted in error logs
IPTABLES = {4: "iptables-legacy", 6: "ip6tables-legacy"}
# the most ports one multiport match takes
MULTIPORT_LIMIT = 15
# peers per `ss -K` call when cutting connections
CUT_CHUNK = 100
COMMAND_TIMEOUT = 60
# the lines of `ipset save` that name a set and that hold an entry
CREATE_LINE = re.compile(r"^create (\S+) ", re.MULTILINE)
ADD_LINE = re.compile(r"^add (\S+) (\S+)(?: .*?timeout (\d+))?", re.MULTILINE)


class EnforcementError(RuntimeError):
    """A kernel change failed; the message quotes the failing command."""


@dataclass(frozen=True)
class ChainRule:
    """The one rule per family that sends blocked sources to the verdict."""

    family: int
    chain: str
    set_name: str
    ports: tuple[int, ...]
    verdict: str

    def spec(self):
        """The rule as `iptables -S` prints it (no port match: all ports)."""
        words = ["-p", "tcp"]
        if self.ports:
            words += ["-m", "multiport", "--dports", self.port_list()]
        words += ["-m", "set", "--match-set", self.set_name, "src", "-j", self.verdict]
        if self.verdict == "REJECT":
            words += ["--reject-with", "tcp-reset"]
        return " ".join(words)

    def port_list(self):
        """The protected ports as multiport writes them: `25,465,587`."""
        return ",".join(str(port) for port in self.ports)

    def build(self):
        """The rule as a python-iptables object."""
        rule = new_rule(self.family)
        rule.protocol = "tcp"
        if self.ports:
            rule.create_match("multiport").dports = self.port_list()
        rule.create_match("set").match_set = [self.set_name, "src"]
        target = rule.create_target(self.verdict)
        if self.verdict == "REJECT":
            target.reject_with = "tcp-reset"
        return rule

    def jump(self):
        """The INPUT rule that sends every packet through the chain."""
        rule = new_rule(self.family)
        rule.create_target(self.chain)
        return rule


def new_rule(family):
    """An empty python-iptables rule of one family."""
    return iptc.Rule() if family == 4 else iptc.Rule6()


@contextmanager
def filter_table(family):
    """The legacy filter table of one family, read fresh; nothing auto-commits."""
    table_class = iptc.Table if family == 4 else iptc.Table6
    table = table_class(table_class.FILTER)
    table.autocommit = False
    table.refresh()
    try:
        yield table
    finally:
        # drop anything left uncommitted, then hand the cached table back as found
        table.refresh()
        table.autocommit = True


@contextmanager
def rule_change(family, command):
    """A filter-table change, committed once; failures raise quoting `command`."""
    try:
        with filter_table(family) as table:
            yield table
            table.commit()
    except iptc.IPTCError as exc:
        log.error("kernel rule change failed: `%s`: %s", command, exc)
        raise EnforcementError(f"`{command}` failed: {exc}") from exc


def run(argv, batch=None):
    """Run a command, returning its result; failing to start reads as exit 127."""
    try:
        return subprocess.run(
            argv,
            input=batch,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return subprocess.CompletedProcess(argv, 127, "", str(exc))


class KernelBackend:
    """Makes the kernel's sets hold exactly the blocks it is given."""

    name = "kernel"
    dry_run = False

    def __init__(self, settings):
        """Rules and set names from the settings; nothing touches the kernel yet."""
        ports = () if settings.all_ports else tuple(settings.ports)
        if not settings.all_ports and not 1 <= len(ports) <= MULTIPORT_LIMIT:
            raise ValueError(
                f'enforcement.ports needs 1 to {MULTIPORT_LIMIT} ports, or "all"'
            )
        self.sets = {4: settings.set_v4, 6: settings.set_v6}
        self.set_size = settings.set_size
        self.ports = ports
        self.rules = {
            family: ChainRule(
                family, settings.chain, self.sets[family], ports, settings.verdict
            )
            for family in FAMILIES
        }
        self._lock = threading.RLock()

    def setup(self):
        """Create the sets, the chain, its rule and the jump where missing."""
        with self._lock:
            _held, present = self._read_sets()
            self._create_sets(present)
            for family in FAMILIES:
                if not self._rule_in_place(family):
                    self._install_rule(family)

    def sync(self, desired):
        """Make the sets hold exactly `desired` (entry -> seconds or None)."""
        with self._lock:
            held, present = self._read_sets()
            if not self._in_place(present):
                self.setup()

            change = plan(held, desired)

            self._restore(self._change_batch(change))
            self._report(change)
            self.cut_connections(change.added)
            return change

    def rebuild(self, desired):
        """Load `desired` into fresh sets and swap them in, all at once."""
        with self._lock:
            self.setup()
            held, present = self._read_sets()
            wanted = wanted_state(desired)
            change = compare(held, wanted)

            batch = []
            for family in FAMILIES:
                batch += self._fresh_set_batch(family, wanted, present)
            self._restore(batch)
            log.info("kernel sets rebuilt with %d entries", len(wanted))
            self._report(change)
            self.cut_connections(change.added)
            return change

    def enforced(self):
        """The entries the kernel holds right now, in sender text form."""
        with self._lock:
            held, _present = self._read_sets()
            return set(held)

    def teardown(self):
        """Remove the jump, the chain and both sets."""
        with self._lock:
            for family in FAMILIES:
                self._remove_rule(family)
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
        listing = entries and best_effort(
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
            best_effort(argv, harmless="0 flow entries")
            log.info("%s: established connections cut", address)
        return addresses

    def _read_sets(self):
        """What our sets hold (entry -> timeout) and the names of all sets."""
        result = run(["ipset", "save"])
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

    def _in_place(self, present):
        """Whether both sets exist and both rules sit where they belong."""
        if not set(self.sets.values()) <= present:
            return False
        return all(self._rule_in_place(family) for family in FAMILIES)

    def _create_sets(self, present):
        """Create whichever of our two sets is missing, in one batch."""
        batch = [
            self._create_line(name, family)
            for family, name in self.sets.items()
            if name not in present
        ]
        self._restore(batch)

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
        result = run(["ipset", "restore", "-exist"], "\n".join(batch) + "\n")
        if result.returncode == 0:
            return

        command = f"ipset restore -exist (a batch of {len(batch)} lines)"
        failed = re.search(r"Error in line (\d+)", result.stderr)
        if failed and 0 < int(failed.group(1)) <= len(batch):
            command += f", failing at `{batch[int(failed.group(1)) - 1]}`"
        raise self._failure(command, result)

    def _rule_in_place(self, family):
        """Whether the chain holds just our rule and INPUT jumps to it first."""
        rule = self.rules[family]
        with filter_table(family) as table:
            if not table.is_chain(rule.chain):
                return False
            chain_rules = iptc.Chain(table, rule.chain).rules
            input_rules = iptc.Chain(table, "INPUT").rules
            jumps = [r for r in input_rules if r.target.name == rule.chain]
            return (
                chain_rules == [rule.build()]
                and jumps == [rule.jump()] == input_rules[:1]
            )

    def _install_rule(self, family):
        """Write the chain, its one rule and the jump at INPUT 1 in one commit."""
        rule = self.rules[family]
        tool = IPTABLES[family]
        command = (
            f"{tool} -N {rule.chain}; {tool} -A {rule.chain} {rule.spec()}; "
            f"{tool} -I INPUT 1 -j {rule.chain}"
        )
        with rule_change(family, command) as table:
            self._unhook(table, rule.chain)
            if not table.is_chain(rule.chain):
                table.create_chain(rule.chain)
            chain = iptc.Chain(table, rule.chain)
            chain.flush()
            chain.append_rule(rule.build())
            iptc.Chain(table, "INPUT").insert_rule(rule.jump())
        log.info("%s: chain %s installed", tool, rule.chain)

    def _remove_rule(self, family):
        """Delete the jump and the chain in one commit, if they exist."""
        rule = self.rules[family]
        tool = IPTABLES[family]
        command = f"{tool} -D INPUT -j {rule.chain}; {tool} -X {rule.chain}"
        with rule_change(family, command) as table:
            if table.is_chain(rule.chain):
                self._unhook(table, rule.chain)
                iptc.Chain(table, rule.chain).flush()
                table.delete_chain(rule.chain)

    @staticmethod
    def _unhook(table, chain_name):
        """Delete every INPUT rule that jumps to our chain."""
        input_chain = iptc.Chain(table, "INPUT")
        for rule in input_chain.rules:
            if rule.target.name == chain_name:
                input_chain.delete_rule(rule)

    def _kill_sockets(self, peer_texts):
        """Close our side of every established connection from these peers."""
        for start in range(0, len(peer_texts), CUT_CHUNK):
            chunk = peer_texts[start : start + CUT_CHUNK]
            peers = " or ".join(
                f"dst [{text}]" if ":" in text else f"dst {text}" for text in chunk
            )
            expression = " and ".join([*self._port_filter(), f"( {peers} )"])
            best_effort(["ss", "-K", "-Htn", "state", "established", expression])

    def _port_filter(self):
        """The ss expression for the protected ports, or none for all ports."""
        if not self.ports:
            return []
        ports = " or ".join(f"sport = :{port}" for port in self.ports)
        return [f"( {ports} )"]

    def _report(self, change):
        """Log what a sync did: a summary at INFO, each entry at DEBUG."""
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


def best_effort(argv, harmless=None):
    """Run a command whose failure is logged, not raised; its output, or None."""
    result = run(argv)
    if result.returncode == 0 or (harmless and harmless in result.stderr):
        return result.stdout
    detail = result.stderr.strip() or f"exit {result.returncode}"
    log.warning("best-effort command failed: `%s`: %s", shlex.join(argv), detail)
    return None


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


def swap_name(name):
    """The name of the fresh set a rebuild fills before swapping it in."""
    return f"{name[:26]}-swap"
