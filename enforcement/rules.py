"""The one rule per family that sends blocked sources to DROP or REJECT.

Two drivers write the same chain, rule and jump, each into one of the two
xtables backends a Debian host may have (see docs/enforcement.md):

- `NftRules` (the default where `iptables` is the nf_tables variant, as on
  Debian 12): one `iptables-nft-restore --noflush` transaction per change, so
  `iptables -S` and `nft list ruleset` show what acts; needs CAP_NET_ADMIN only.
- `LegacyRules`: python-iptables (libiptc) on the legacy tables, for hosts
  whose `iptables` is the legacy variant; libiptc also needs CAP_NET_RAW.
"""

import logging
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass

from appliance.config import MOST_PORTS
from enforcement.commands import run

log = logging.getLogger(__name__)

FAMILIES = (4, 6)
# the most ports one multiport match takes
MULTIPORT_LIMIT = MOST_PORTS


# the counter nft prints in each rule
COUNTER = re.compile(r" counter packets \d+ bytes \d+")
# what iptables says when it may not look a set up (no CAP_NET_RAW)
NO_SET_LOOKUP = "Can't open socket to ipset"


class EnforcementError(RuntimeError):
    """A kernel change failed; the message quotes the failing command."""


class SetLookupDenied(EnforcementError):
    """iptables could not read or write the set match: it needs CAP_NET_RAW."""


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


def chain_rules(settings, sets):
    """The ChainRule of each family, from the settings and the set names."""
    ports = () if settings.all_ports else tuple(settings.ports)
    if not settings.all_ports and not 1 <= len(ports) <= MULTIPORT_LIMIT:
        raise ValueError(
            f'enforcement.ports needs 1 to {MULTIPORT_LIMIT} ports, or "all"'
        )
    return {
        family: ChainRule(family, settings.chain, sets[family], ports, settings.verdict)
        for family in FAMILIES
    }


def rules_driver(settings, rules):
    """The driver the `enforcement.iptables` setting asks for (auto: as `iptables`)."""
    wanted = settings.iptables
    if wanted == "auto":
        wanted = iptables_variant()
    return LegacyRules(rules) if wanted == "legacy" else NftRules(rules)


def iptables_variant():
    """`nft` or `legacy`: which backend this host's `iptables` command drives."""
    if shutil.which("iptables") is None:
        return "nft"
    version = run(["iptables", "--version"]).stdout
    return "legacy" if "(legacy)" in version else "nft"


def failure(command, detail):
    """Log a failed rule change quoting the command, and make the error."""
    if NO_SET_LOOKUP in str(detail):
        detail = (
            f"{detail} (iptables looks sets up through a raw socket, which needs "
            "CAP_NET_RAW: run `python -m enforcement setup` as root before the "
            "daemon starts)"
        )
        log.error("kernel rule change failed: `%s`: %s", command, detail)
        return SetLookupDenied(f"`{command}` failed: {detail}")
    log.error("kernel rule change failed: `%s`: %s", command, detail)
    return EnforcementError(f"`{command}` failed: {detail}")


class NftRules:
    """The chain in the nf_tables `filter` table, through iptables-nft-restore."""

    name = "nft"
    TOOLS = {4: "iptables-nft", 6: "ip6tables-nft"}

    def __init__(self, rules):
        """Drive the given ChainRule per family."""
        self.rules = rules

    def in_place(self, family):
        """Whether the chain holds just our rule and INPUT jumps to it first."""
        rule = self.rules[family]
        try:
            lines = self._saved(family)
        except SetLookupDenied:
            return self._listed_in_place(family)
        chain = [line for line in lines if line.startswith(f"-A {rule.chain} ")]
        inputs = [line for line in lines if line.startswith("-A INPUT ")]
        jump = f"-A INPUT -j {rule.chain}"
        return (
            chain == [f"-A {rule.chain} {rule.spec()}"]
            and inputs[:1] == [jump]
            and inputs.count(jump) == 1
        )

    def install(self, family):
        """Write the chain, its one rule and the jump at INPUT 1 in one transaction."""
        rule = self.rules[family]
        stale = self._jumps(family)
        batch = [
            "*filter",
            f":{rule.chain} - [0:0]",
            *[f"-D INPUT -j {rule.chain}"] * stale,
            f"-I INPUT 1 -j {rule.chain}",
            f"-A {rule.chain} {rule.spec()}",
            "COMMIT",
        ]
        self._restore(family, batch)
        log.info("%s: chain %s installed", self.TOOLS[family], rule.chain)

    def remove(self, family):
        """Delete the jumps and the chain in one transaction, if they exist."""
        rule = self.rules[family]
        if not any(line.startswith(f":{rule.chain} ") for line in self._saved(family)):
            return
        batch = [
            "*filter",
            *[f"-D INPUT -j {rule.chain}"] * self._jumps(family),
            f"-F {rule.chain}",
            f"-X {rule.chain}",
            "COMMIT",
        ]
        self._restore(family, batch)

    def _listed_in_place(self, family):
        """The same check through `nft list`, which needs no set lookup.

        Without CAP_NET_RAW iptables cannot print the set match; nft shows it
        as `xt match set` without the set's name, so only the shape is checked:
        one rule with the set match and our verdict, and the jump first.
        """
        rule = self.rules[family]
        table = "ip filter" if family == 4 else "ip6 filter"
        verdict = "reject" if rule.verdict == "REJECT" else "drop"
        chain = self._listed(f"{table} {rule.chain}")
        inputs = self._listed(f"{table} INPUT")
        return (
            len(chain) == 1
            and "xt match set" in chain[0]
            and verdict in chain[0]
            and inputs[:1] != []
            and inputs[0].endswith(f"jump {rule.chain}")
            and sum(line.endswith(f"jump {rule.chain}") for line in inputs) == 1
        )

    @staticmethod
    def _listed(chain):
        """The rule lines of one nft chain, without counters; [] when missing."""
        result = run(["nft", "list", "chain", *chain.split()])
        if result.returncode != 0:
            return []
        lines = [line.strip() for line in result.stdout.splitlines()]
        rules = [line for line in lines[2:-2] if line and not line.startswith("type ")]
        return [COUNTER.sub("", line) for line in rules]

    def _jumps(self, family):
        """How many INPUT rules jump to our chain now."""
        jump = f"-A INPUT -j {self.rules[family].chain}"
        return self._saved(family).count(jump)

    def _saved(self, family):
        """The filter table as `iptables-nft-save` prints it, line by line."""
        argv = [f"{self.TOOLS[family]}-save", "-t", "filter"]
        result = run(argv)
        if result.returncode != 0:
            detail = result.stderr.strip() or "failed"
            if NO_SET_LOOKUP in detail:
                raise SetLookupDenied(detail)
            raise failure(" ".join(argv), detail)
        return [line.rstrip() for line in result.stdout.splitlines()]

    def _restore(self, family, batch):
        """Apply one `*filter` batch as one transaction."""
        tool = f"{self.TOOLS[family]}-restore"
        result = run([tool, "--noflush"], "\n".join(batch) + "\n")
        if result.returncode != 0:
            shown = "; ".join(batch[1:-1])
            raise failure(f"{tool} --noflush <<< {shown}", result.stderr.strip())


class LegacyRules:
    """The chain in the legacy xtables `filter` table, through python-iptables."""

    name = "legacy"
    TOOLS = {4: "iptables-legacy", 6: "ip6tables-legacy"}

    def __init__(self, rules):
        """Drive the given ChainRule per family."""
        import iptc

        self.iptc = iptc
        self.rules = rules

    def in_place(self, family):
        """Whether the chain holds just our rule and INPUT jumps to it first."""
        rule = self.rules[family]
        with self._table(family) as table:
            if not table.is_chain(rule.chain):
                return False
            held = self.iptc.Chain(table, rule.chain).rules
            input_rules = self.iptc.Chain(table, "INPUT").rules
            jumps = [r for r in input_rules if r.target.name == rule.chain]
            jump = self._jump(family)
            return held == [self._build(family)] and jumps == [jump] == input_rules[:1]

    def install(self, family):
        """Write the chain, its one rule and the jump at INPUT 1 in one commit."""
        rule = self.rules[family]
        tool = self.TOOLS[family]
        command = (
            f"{tool} -N {rule.chain}; {tool} -A {rule.chain} {rule.spec()}; "
            f"{tool} -I INPUT 1 -j {rule.chain}"
        )
        with self._change(family, command) as table:
            self._unhook(table, rule.chain)
            if not table.is_chain(rule.chain):
                table.create_chain(rule.chain)
            chain = self.iptc.Chain(table, rule.chain)
            chain.flush()
            chain.append_rule(self._build(family))
            self.iptc.Chain(table, "INPUT").insert_rule(self._jump(family))
        log.info("%s: chain %s installed", tool, rule.chain)

    def remove(self, family):
        """Delete the jump and the chain in one commit, if they exist."""
        rule = self.rules[family]
        tool = self.TOOLS[family]
        command = f"{tool} -D INPUT -j {rule.chain}; {tool} -X {rule.chain}"
        with self._change(family, command) as table:
            if table.is_chain(rule.chain):
                self._unhook(table, rule.chain)
                self.iptc.Chain(table, rule.chain).flush()
                table.delete_chain(rule.chain)

    def _new_rule(self, family):
        """An empty python-iptables rule of one family."""
        return self.iptc.Rule() if family == 4 else self.iptc.Rule6()

    def _build(self, family):
        """The chain's rule as a python-iptables object."""
        rule = self.rules[family]
        built = self._new_rule(family)
        built.protocol = "tcp"
        if rule.ports:
            built.create_match("multiport").dports = rule.port_list()
        built.create_match("set").match_set = [rule.set_name, "src"]
        target = built.create_target(rule.verdict)
        if rule.verdict == "REJECT":
            target.reject_with = "tcp-reset"
        return built

    def _jump(self, family):
        """The INPUT rule that sends every packet through the chain."""
        jump = self._new_rule(family)
        jump.create_target(self.rules[family].chain)
        return jump

    @contextmanager
    def _table(self, family):
        """The legacy filter table of one family, read fresh; nothing auto-commits."""
        iptc = self.iptc
        table_class = iptc.Table if family == 4 else iptc.Table6
        table = table_class(table_class.FILTER)
        table.autocommit = False
        table.refresh()
        try:
            yield table
        finally:
            # drop anything left uncommitted, then hand the table back as found
            table.refresh()
            table.autocommit = True

    @contextmanager
    def _change(self, family, command):
        """A filter-table change, committed once; failures raise quoting `command`."""
        try:
            with self._table(family) as table:
                yield table
                table.commit()
        except self.iptc.IPTCError as exc:
            raise failure(command, exc) from exc

    def _unhook(self, table, chain_name):
        """Delete every INPUT rule that jumps to our chain."""
        input_chain = self.iptc.Chain(table, "INPUT")
        for rule in input_chain.rules:
            if rule.target.name == chain_name:
                input_chain.delete_rule(rule)
