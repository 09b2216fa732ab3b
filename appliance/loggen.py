"""A realistic gateway mail log with its ground truth, for tests, demos and benches.

Senders come in classes (clean, spammers, virus senders, directory harvesters,
bounce floods, and low-volume ones that stay under the thresholds), IPv4 and
IPv6, written as Debian 12's Postfix, amavis and rspamd log them. The ground
truth is worked out here by brute force, straight from SPEC §2 and §4, with no
code shared with the profiler.
"""

import argparse
import json
import random
import sys
import time
from dataclasses import dataclass
from dataclasses import field
from datetime import UTC
from datetime import datetime

from appliance import addresses
from appliance import config
from appliance.config import THREAT_TYPES
from appliance.config import RuleDefaults

HOST = "mx1"
DOMAIN = "example.com"
IPV4_SENDERS = 720
USERS = ("alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi")


@dataclass
class Transaction:
    """One SMTP transaction as the profiler must count it."""

    ts: float
    ip: str
    violations: tuple = ()
    recipients: int = 1
    unknown: int = 0


@dataclass
class Sender:
    """One sending host: its address, class and what it will send."""

    ip: str
    name: str
    kind: str
    transactions: list = field(default_factory=list)


# --- the senders -------------------------------------------------------------

CLASSES = {
    # kind: (count, (min, max) transactions, burst minutes or None = spread)
    "clean": (180, (1, 12), None),
    "spammer": (16, (30, 60), 30),
    "light-spammer": (12, (3, 12), 40),
    "virus": (5, (26, 40), 30),
    "harvester": (10, (26, 45), 20),
    "light-harvester": (6, (2, 6), 20),
    "bounce-flood": (6, (30, 50), 30),
}


def make_senders(rng, scale=1.0):
    """Senders of every class, about 3 in 10 of them IPv6."""
    senders = []
    serial = 0
    for kind, (count, _span, _burst) in CLASSES.items():
        for _ in range(max(1, int(count * scale))):
            serial += 1
            # 720 IPv4 documentation addresses at most; IPv6 beyond them
            if rng.random() < 0.3 or serial >= IPV4_SENDERS:
                host = rng.randrange(1, 0xFFFF)
                ip = f"2001:db8:{serial // 256:x}:{serial % 256:x}::{host:x}"
            else:
                # hosts .10 to .249: the low numbers are gateways and lab hosts
                block = ("192.0.2", "198.51.100", "203.0.113")[serial // 240 % 3]
                ip = f"{block}.{serial % 240 + 10}"
            name = "unknown" if rng.random() < 0.4 else f"host{serial}.example.net"
            senders.append(Sender(ip=ip, name=name, kind=kind))
    # two addresses in one /64 count as one sender
    twin = next(s for s in senders if s.kind == "harvester" and ":" in s.ip)
    network = addresses.sender_of(twin.ip)
    senders.append(
        Sender(ip=str(network.network_address + 7), name="unknown", kind="harvester")
    )
    return senders


def plan(rng, senders, start, hours):
    """Fill each sender's transactions between `start` and `start + hours`."""
    span = hours * 3600
    for sender in senders:
        _count, (low, high), burst = CLASSES[sender.kind]
        count = rng.randint(low, high)
        if burst is None:
            times = sorted(start + rng.uniform(0, span) for _ in range(count))
        else:
            begin = start + rng.uniform(0, span - burst * 60)
            times = sorted(begin + rng.uniform(0, burst * 60) for _ in range(count))
        for ts in times:
            sender.transactions.append(_transaction(rng, sender, int(ts)))


def _transaction(rng, sender, ts):
    """What one transaction of this sender's class does."""
    kind = sender.kind
    if kind == "clean":
        roll = rng.random()
        if roll < 0.04:
            return Transaction(ts, sender.ip, ("spam",))
        if roll < 0.08:
            return Transaction(ts, sender.ip, ("bounce",))
        return Transaction(ts, sender.ip, (), rng.choice((1, 1, 1, 2)))
    if kind in ("spammer", "light-spammer"):
        spam = rng.random() < 0.7
        return Transaction(ts, sender.ip, ("spam",) if spam else ())
    if kind == "virus":
        return Transaction(ts, sender.ip, ("virus",) if rng.random() < 0.4 else ())
    if kind in ("harvester", "light-harvester"):
        unknown = rng.randint(1, 3)
        accepted = 1 if rng.random() < 0.2 else 0
        return Transaction(ts, sender.ip, ("dha",), unknown + accepted, unknown)
    if kind == "bounce-flood":
        return Transaction(ts, sender.ip, ("bounce",), 1)
    raise ValueError(kind)


# --- writing the log ---------------------------------------------------------


class Writer:
    """Turns transactions into log lines in Postfix/amavis/rspamd formats."""

    def __init__(self, rng, switch_at=None):
        self.rng = rng
        self.switch_at = switch_at
        self.serial = 0

    def stamp(self, ts):
        """Classic syslog stamps before `switch_at`, RFC 3339 from then on."""
        if self.switch_at is not None and ts < self.switch_at:
            local = time.localtime(ts)
            return f"{time.strftime('%b', local)} {local.tm_mday:2d} " + time.strftime(
                "%H:%M:%S", local
            )
        moment = datetime.fromtimestamp(ts, UTC).astimezone()
        return moment.isoformat(timespec="microseconds")

    def queue_id(self):
        """A Postfix short queue id."""
        self.serial += 1
        return f"{self.serial:05X}{self.rng.randrange(16**5):05X}"

    def lines(self, sender, tx):
        """The lines one transaction leaves in the log, in order."""
        rng = self.rng
        s = self.stamp(tx.ts)
        pid = rng.randrange(2000, 60000)
        client = f"{sender.name}[{sender.ip}]"
        helo = sender.name if sender.name != "unknown" else f"[{sender.ip}]"
        mail_from = "" if "bounce" in tx.violations else f"news@{sender.name}"
        if sender.name == "unknown" and mail_from:
            mail_from = f"info@sender{pid}.example.org"
        rcpts = [f"{rng.choice(USERS)}@{DOMAIN}" for _ in range(tx.recipients)]
        out = [f"{s} {HOST} postfix/smtpd[{pid}]: connect from {client}"]

        if "dha" in tx.violations:
            for n in range(tx.unknown):
                rcpt = f"user{rng.randrange(10**6)}@{DOMAIN}"
                out.append(
                    f"{s} {HOST} postfix/smtpd[{pid}]: NOQUEUE: reject: RCPT from "
                    f"{client}: 550 5.1.1 <{rcpt}>: Recipient address rejected: User "
                    f"unknown in virtual mailbox table; from=<{mail_from}> "
                    f"to=<{rcpt}> proto=ESMTP helo=<{helo}>"
                )
                rcpts[n] = None
            rcpts = [r for r in rcpts if r]
            if not rcpts:
                out.append(
                    f"{s} {HOST} postfix/smtpd[{pid}]: disconnect from {client} ehlo=1 "
                    f"mail=1 rcpt=0/{tx.unknown} quit=1 commands=3/{3 + tx.unknown}"
                )
                return out

        qid = self.queue_id()
        out.append(f"{s} {HOST} postfix/smtpd[{pid}]: {qid}: client={client}")
        out.append(
            f"{s} {HOST} postfix/cleanup[{pid + 1}]: {qid}: "
            f"message-id=<{rng.randrange(10**9)}@{sender.name}>"
        )
        if "spam" in tx.violations and rng.random() < 0.5:
            out.append(
                f"{s} {HOST} postfix/cleanup[{pid + 1}]: {qid}: milter-reject: "
                f"END-OF-MESSAGE from {client}: 5.7.1 Spam message rejected; "
                f"from=<{mail_from}> to=<{rcpts[0]}> proto=ESMTP helo=<{helo}>"
            )
        else:
            out.extend(self._queued(s, sender, tx, qid, mail_from, rcpts))
        out.append(
            f"{s} {HOST} postfix/smtpd[{pid}]: disconnect from {client} ehlo=1 mail=1 "
            f"rcpt={len(rcpts)}/{len(rcpts) + tx.unknown} data=1 quit=1 commands=5"
        )
        return out

    def _queued(self, s, sender, tx, qid, mail_from, rcpts):
        """qmgr, amavis and delivery lines of an accepted message."""
        rng = self.rng
        size = rng.randrange(900, 90000)
        amavis = rng.randrange(1000, 9999)
        lines = [
            f"{s} {HOST} postfix/qmgr[812]: {qid}: from=<{mail_from}>, size={size}, "
            f"nrcpt={len(rcpts)} (queue active)"
        ]
        if "virus" in tx.violations:
            verdict = (
                "Blocked INFECTED (Eicar-Signature) {DiscardedInbound,Quarantined}"
            )
        elif "spam" in tx.violations:
            verdict = "Blocked SPAM {DiscardedInbound,Quarantined}"
        else:
            verdict = "Passed CLEAN {RelayedInbound}"
        lines.append(
            f"{s} {HOST} amavis[{amavis}]: ({amavis}-01) {verdict}, "
            f"[{sender.ip}]:{rng.randrange(1024, 65535)} [{sender.ip}] "
            f"<{mail_from}> -> <{rcpts[0]}>, Queue-ID: {qid}, "
            f"Message-ID: <{rng.randrange(10**9)}@{sender.name}>, "
            f"mail_id: m{rng.randrange(10**8)}, Hits: {rng.uniform(-2, 30):.3f}, "
            f"size: {size}, {rng.randrange(50, 900)} ms"
        )
        if verdict.startswith("Passed"):
            requeued = self.queue_id()
            lines += [
                f"{s} {HOST} postfix/smtpd[{amavis + 1}]: connect from "
                "localhost[127.0.0.1]",
                f"{s} {HOST} postfix/smtpd[{amavis + 1}]: {requeued}: "
                "client=localhost[127.0.0.1]",
                f"{s} {HOST} postfix/qmgr[812]: {requeued}: from=<{mail_from}>, "
                f"size={size + 600}, nrcpt={len(rcpts)} (queue active)",
                f"{s} {HOST} postfix/lmtp[{amavis + 2}]: {requeued}: to=<{rcpts[0]}>, "
                "relay=mailstore.example.com[198.51.100.250]:24, delay=0.2, "
                "dsn=2.0.0, status=sent (250 2.0.0 Ok)",
                f"{s} {HOST} postfix/qmgr[812]: {requeued}: removed",
            ]
        lines.append(f"{s} {HOST} postfix/qmgr[812]: {qid}: removed")
        return lines


GARBAGE = (
    "this line is not from any mail program",
    "Dec 99 99:99:99 mx1 postfix/smtpd[1]: connect from",
    "\x00\x01binary noise\x7f",
    "2026-13-45T25:61:00+00:00 mx1 amavis[1]: (1-01) Blocked SPAM",
)


def write_log(handle, senders, writer, rng, garbage_every=0):
    """Write every transaction's lines in time order; returns garbage lines written."""
    timeline = sorted(
        (
            (tx.ts, n, sender, tx)
            for n, sender in enumerate(senders)
            for tx in sender.transactions
        ),
        key=lambda item: (item[0], item[1]),
    )
    garbage = 0
    for count, (_ts, _n, sender, tx) in enumerate(timeline, 1):
        for line in writer.lines(sender, tx):
            handle.write(line + "\n")
        if garbage_every and count % garbage_every == 0:
            handle.write(rng.choice(GARBAGE) + "\n")
            garbage += 1
    return garbage


# --- the ground truth ----------------------------------------------------------


def expected_outcome(senders, rules, ipv6_prefix=64):
    """Blocks and episodes SPEC §2/§4 call for, by brute force over the windows.

    `rules` maps a threat type to an object with RuleDefaults' fields.
    Each transaction is one event at its time stamp; a sender is blocked the
    first time, outside a block in force, that any rule is crossed.
    """
    events = sorted(
        (
            (
                tx.ts,
                n,
                addresses.sender_text(addresses.sender_of(tx.ip, ipv6_prefix)),
                tx,
            )
            for n, sender in enumerate(senders)
            for tx in sender.transactions
        ),
        key=lambda item: (item[0], item[1]),
    )
    seen = {}
    episodes = []
    open_episode = {}
    blocks = []
    blocked_until = {}

    for ts, _n, who, tx in events:
        history = seen.setdefault(who, [])
        history.append(tx)
        in_force = blocked_until.get(who, -1) > ts
        for threat_type in THREAT_TYPES:
            rule = rules[threat_type]
            current = open_episode.get((who, threat_type))
            if current and ts - current["last_seen"] >= rule.window:
                current = open_episode.pop((who, threat_type))
                current = None
            if threat_type in tx.violations:
                if current is None:
                    current = {
                        "ip": who,
                        "type": threat_type,
                        "first_seen": ts,
                        "last_seen": ts,
                        "violations": 1,
                        "messages": 1,
                        "status": "blocked" if in_force else "suspicious",
                    }
                    episodes.append(current)
                    open_episode[(who, threat_type)] = current
                else:
                    current["violations"] += 1
                    current["messages"] += 1
                    current["last_seen"] = ts
            elif current is not None:
                current["messages"] += 1

        for threat_type in THREAT_TYPES:
            rule = rules[threat_type]
            current = open_episode.get((who, threat_type))
            if not rule.enabled or current is None:
                continue
            inside = [t for t in history if t.ts > ts - rule.window]
            messages = len(inside)
            violations = sum(1 for t in inside if threat_type in t.violations)
            if messages <= rule.messages or violations * 100.0 / messages <= rule.rate:
                continue
            if threat_type == "dha" and not (
                sum(t.recipients for t in inside) > rule.recipients
                and sum(t.unknown for t in inside) > rule.unknown_recipients
            ):
                continue
            if rule.action == "monitor":
                if current["status"] == "suspicious":
                    current["status"] = "monitored"
                continue
            if blocked_until.get(who, -1) > ts:
                continue
            permanent = rule.action == "permanent"
            expires = None if permanent else ts + rule.duration
            blocks.append(
                {
                    "ip": who,
                    "type": threat_type,
                    "created_at": ts,
                    "expires_at": expires,
                }
            )
            blocked_until[who] = float("inf") if permanent else expires
            for episode in episodes:
                if episode["ip"] == who and episode["status"] != "approved":
                    episode["status"] = "blocked"
    return {"blocks": blocks, "episodes": episodes}


def generate(path, seed=1, hours=3, scale=1.0, rules=None, end=None, garbage_every=97):
    """Write a log to `path`; returns the ground truth (with sender classes)."""
    rng = random.Random(seed)
    end = time.time() - 60 if end is None else end
    start = int(end - hours * 3600)
    senders = make_senders(rng, scale)
    plan(rng, senders, start, hours)
    writer = Writer(rng, switch_at=start + hours * 1800)
    with open(path, "w") as handle:
        garbage = write_log(handle, senders, writer, rng, garbage_every)
    rules = rules or {t: RuleDefaults() for t in THREAT_TYPES}
    truth = expected_outcome(senders, rules)
    truth["garbage_lines"] = garbage
    truth["senders"] = [{"ip": s.ip, "kind": s.kind} for s in senders]
    return truth


def follow(path, rng, rate):
    """Append live traffic to `path` forever, about `rate` transactions a second."""
    senders = make_senders(rng, 0.5)
    writer = Writer(rng)
    weights = [3.0 if s.kind == "clean" else 1.0 for s in senders]
    while True:
        sender = rng.choices(senders, weights)[0]
        tx = _transaction(rng, sender, int(time.time()))
        # reopened for every message, so a rotated log gets the new lines
        with open(path, "a") as handle:
            handle.write("".join(line + "\n" for line in writer.lines(sender, tx)))
        time.sleep(rng.expovariate(rate))


def main(argv=None):
    """`python -m appliance.loggen`: write a log and its truth, or follow live."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log", help="log file to write")
    parser.add_argument("--truth", help="write the ground truth as JSON here")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--hours", type=float, default=3)
    parser.add_argument("--scale", type=float, default=1.0, help="sender count factor")
    parser.add_argument(
        "--live", type=float, metavar="RATE", help="append live traffic"
    )
    parser.add_argument("--config", help="take the truth's rules from this file")
    args = parser.parse_args(argv)
    rules = config.load(args.config).rules if args.config else None

    if args.live:
        try:
            follow(args.log, random.Random(args.seed), args.live)
        except KeyboardInterrupt:
            return 0
    truth = generate(args.log, args.seed, args.hours, args.scale, rules)
    if args.truth:
        with open(args.truth, "w") as handle:
            json.dump(truth, handle, indent=1)
    print(
        f"{args.log}: {len(truth['senders'])} senders, {len(truth['blocks'])} blocks, "
        f"{len(truth['episodes'])} episodes expected",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
