"""The `sender-filter` command (SPEC §10)."""

import argparse
import getpass
import json
import logging
import os
import secrets
import sys

from appliance import config
from appliance import kernelstatus
from appliance import lists
from appliance import models
from appliance import service
from appliance.queries import MATCH_CAP
from appliance.queries import status_now
from appliance.timefmt import format_duration
from appliance.timefmt import iso
from appliance.timefmt import parse_duration

log = logging.getLogger(__name__)
# an approve that lifts more blocks than this names these and counts the rest
NAMED_LIFTS = 10


class UsageError(Exception):
    """Bad input from the command line: printed as one line, exit status 2."""


def main(argv=None):
    """Entry point: parse, run one subcommand, turn errors into one line."""
    parser = build_parser()
    args = parser.parse_args(argv)
    quiet = logging.INFO if args.command in ("run", "web") else logging.WARNING
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else quiet,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # every SQL statement at DEBUG would bury what -v is for
    logging.getLogger("peewee").setLevel(logging.INFO)

    try:
        settings = config.load(args.config)
        if args.command != "init" and not settings.database.exists():
            raise UsageError(
                f"no database at {settings.database}: run `sender-filter init` first"
            )
        models.connect(settings.database)
        service.configure(settings)
        result = run_handler(settings, args)
    except (config.ConfigError, UsageError, service.Refused, OSError) as exc:
        print(f"sender-filter {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.command == "ingest":
            from appliance.ingest import RESUME

            print(f"sender-filter ingest: interrupted; {RESUME}", file=sys.stderr)
        return 130

    if result is not None:
        try:
            emit(result, args.json)
        except BrokenPipeError:
            sys.stderr.close()
    return 0


def run_handler(settings, args):
    """Run the subcommand; what it audits is marked with where it was typed."""
    if args.command in ("run", "web"):
        return args.handler(settings, args)
    source = service.acting_from.set(command_line_source())
    try:
        return args.handler(settings, args)
    finally:
        service.acting_from.reset(source)


def command_line_source():
    """Where a command comes from: the SSH client's address, or this machine."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid {os.getuid()}"
    ssh_client = os.environ.get("SSH_CONNECTION", "").split(" ")[0]
    return f"{ssh_client} (ssh, {user})" if ssh_client else f"local ({user})"


def emit(result, as_json):
    """Print a result: JSON with --json, else its text form."""
    payload, text = result
    if as_json:
        print(json.dumps(payload, indent=2, sort_keys=True))
    elif text:
        print(text)


class Parser(argparse.ArgumentParser):
    """argparse, with bad usage reported in one line."""

    def error(self, message):
        """Print one line naming the command, and exit with status 2."""
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def common_options(default):
    """--config, --json and -v, taken before or after the subcommand."""
    common = Parser(add_help=False)
    common.add_argument(
        "--config",
        default=default(None),
        help="config file (default: $SENDER_FILTER_CONFIG, "
        "/etc/sender-filter/config.toml, ./var/config.toml)",
    )
    common.add_argument("--json", action="store_true", default=default(False))
    common.add_argument("-v", "--verbose", action="store_true", default=default(False))
    return common


def build_parser():
    """Every subcommand with its options."""
    parser = Parser(
        prog="sender-filter",
        description=__doc__,
        parents=[common_options(lambda value: value)],
    )
    # after the subcommand, an option left out must not undo one given before it
    common = common_options(lambda _value: argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name, handler, text):
        sub = commands.add_parser(name, parents=[common], help=text, description=text)
        sub.set_defaults(handler=handler)
        return sub

    command("init", cmd_init, "create the database and the first administrator")
    command("run", cmd_run, "the daemon: follow logs, profile, schedule, enforce")
    command("web", cmd_web, "the console (development server)")
    command("status", cmd_status, "sources, lines read and not understood, blocks")
    ingest = command(
        "ingest", cmd_ingest, "read logs from where they stopped (catch-up)"
    )
    ingest.add_argument(
        "files",
        nargs="+",
        metavar="FILE",
        help="log files, rotated (.1, .2.gz, -YYYYMMDD) ones too, in any order",
    )
    suspicious = command("suspicious", cmd_suspicious, "the Suspicious IP log")
    suspicious.add_argument("--type", action="append", dest="types", default=[])
    suspicious.add_argument("--ip", default="")
    suspicious.add_argument("--since", default="")
    suspicious.add_argument("--until", default="")
    suspicious.add_argument(
        "--limit",
        type=entry_limit,
        default=100,
        help=f"show at most this many entries, 1 to {MATCH_CAP} (default 100)",
    )
    blocks = command("blocks", cmd_blocks, "active blocks")
    blocks.add_argument("--all", action="store_true", help="lifted ones too")
    block = command("block", cmd_block, "block an IP, a CIDR or a domain name")
    block.add_argument("target")
    span = block.add_mutually_exclusive_group()
    span.add_argument("--for", dest="duration", default="1h", help="e.g. 30m, 1h, 2d")
    span.add_argument("--permanent", action="store_true")
    block.add_argument("--reason", default="")
    for name, handler, what in (
        ("unblock", cmd_unblock, "an IP or CIDR"),
        ("approve", cmd_approve, "an IP, a CIDR or a domain name"),
        ("unapprove", cmd_unapprove, "an IP or CIDR"),
    ):
        command(name, handler, f"{name} {what}").add_argument("target")
    admin = command("admin", cmd_admin, "administrators")
    admin.add_argument("action", choices=["add"])
    admin.add_argument("name")
    token = command("token", cmd_token, "API tokens for /api/v1/")
    token.add_argument("action", choices=["add", "revoke", "list"])
    token.add_argument("name", nargs="?", default="")
    return parser


def cmd_init(settings, args):
    """Create the database, the rules and the first administrator."""
    if not settings.secret_key_file.exists():
        settings.secret_key_file.parent.mkdir(parents=True, exist_ok=True)
        settings.secret_key_file.write_text(secrets.token_hex(32))
        settings.secret_key_file.chmod(0o600)
    service.seed_rules(settings)

    if models.Admin.select().exists():
        text = f"database {settings.database} ready; administrators already exist"
        return {"database": str(settings.database), "admin": None}, text
    password = service.add_admin("admin")
    text = (
        f"database {settings.database} ready\n"
        f"administrator: admin\npassword: {password}  (shown once; keep it)"
    )
    return {
        "database": str(settings.database),
        "admin": "admin",
        "password": password,
    }, text


def cmd_run(settings, args):
    """Run the daemon in the foreground."""
    from appliance.daemon import Daemon
    from enforcement import make_backend

    Daemon(settings, make_backend(settings)).run()


def cmd_web(settings, args):
    """Serve the console with waitress (production uses gunicorn)."""
    import waitress

    from web import create_app

    app = create_app(settings)
    print(f"console on http://{settings.web_host}:{settings.web_port}/", flush=True)
    waitress.serve(app, host=settings.web_host, port=settings.web_port, threads=8)


def cmd_ingest(settings, args):
    """Catch up on log files (rotated and .gz ones too), each from where it stopped."""
    from appliance.ingest import read_files

    summary = read_files(settings, args.files, progress=sys.stderr.isatty())
    lifted = service.expire_due()
    summary["expired_blocks"] = len(lifted)
    files = sum(len(source["files"]) for source in summary["sources"])
    text = (
        f"{summary['lines']} lines read ({summary['skipped']} not understood) "
        f"from {files} file{'' if files == 1 else 's'}, "
        f"{summary['blocks']} blocks made, {summary['entries']} suspicious entries"
    )
    return summary, text


def cmd_status(settings, args):
    """Per source: lines read and not understood, and how far reading is behind."""
    from appliance.ingest import source_status

    sources = source_status()
    for source in sources:
        source["updated_at"] = iso(source["updated_at"])
    enforcement = enforcement_json(kernelstatus.published())
    dry_run = enforcement["backend"] == "dry-run"
    kernel = dict.fromkeys(kernelstatus.STATUSES, 0)
    for block in service.active_blocks():
        kernel[kernelstatus.block_status(block, dry_run)] += 1
    active = sum(kernel.values())
    lines = [
        f"{s['path']}: {s['lines']} lines, {s['skipped']} not understood"
        + (f", {s['behind']} bytes to read" if s["behind"] else "")
        + (f" (last read {s['updated_at']})" if s["updated_at"] else "")
        for s in sources
    ]
    counts = ", ".join(f"{n} {words}" for words, n in kernel.items() if n)
    lines.append(f"{active} active blocks" + (f": {counts}" if counts else ""))
    lines += enforcement_lines(enforcement)
    payload = {"sources": sources, "active_blocks": active, "kernel": kernel}
    return {**payload, "enforcement": enforcement}, "\n".join(lines)


def enforcement_json(state):
    """What the daemon published about enforcement, and the console's notice."""
    backend = state.get("enforcement")
    checked = state.get("kernel_checked_at")
    error = state.get("enforcement_error")
    return {
        "backend": backend.value if backend else None,
        "kernel_checked_at": iso(float(checked.value)) if checked else "",
        "error": error.value if error else "",
        "notice": kernelstatus.notice(state),
    }


def enforcement_lines(facts):
    """Lines under a listing: the backend, its last check, the console's notice."""
    lines = []
    if facts["backend"]:
        checked = facts["kernel_checked_at"] or "not yet"
        lines.append(f"enforcement: {facts['backend']}, kernel last checked {checked}")
    if facts["notice"]:
        lines.append(facts["notice"])
    return lines


def entry_limit(text):
    """--limit of `suspicious`: 1 to MATCH_CAP, as far as the console's pages reach."""
    text = text.strip()
    if text.isascii() and text.isdigit() and len(text) <= 9:
        if 1 <= int(text) <= MATCH_CAP:
            return int(text)
    raise argparse.ArgumentTypeError(
        f"{text!r} is not a number of entries from 1 to {MATCH_CAP}"
    )


def cmd_suspicious(settings, args):
    """The Suspicious IP log, newest first; a last line says when more match."""
    from appliance.queries import SuspiciousQuery
    from appliance.queries import active_blocks_for

    query, errors = SuspiciousQuery.from_args(
        {
            "type": args.types,
            "ip": args.ip,
            "from": args.since,
            "to": args.until,
            "per_page": "100",
        }
    )
    if errors:
        raise UsageError("; ".join(f"{field}: {msg}" for field, msg in errors.items()))
    entries = query.rows(limit=args.limit)
    blocks = active_blocks_for(entries, settings.widest_v4, settings.widest_v6)
    rows = [entry_json(e, blocks.get(e.id)) for e in entries]
    text = "\n".join(
        f"{r['last_seen']}  {r['type']:<6} {r['ip']:<24} "
        f"{r['violations']:>5}/{r['messages']:<5} {r['rate']:>6.2f}%  {r['status']}"
        for r in rows
    )
    if len(rows) == args.limit:
        text += shown_of(len(rows), query.count())
    return rows, text or "no entries"


def shown_of(shown, counted):
    """The line under a listing cut at --limit: how many of how many are shown."""
    total, more = counted
    if total <= shown and not more:
        return ""
    of = f"{total:,}+" if more else f"{total:,}"
    if shown < MATCH_CAP:
        return f"\n{shown:,} of {of} shown; --limit to see more"
    return f"\n{shown:,} of {of} shown; narrow with --type, --ip, --since or --until"


def entry_json(entry, block):
    """A suspicious entry as JSON, with its status as of now."""
    return {
        "ip": entry.sender,
        "type": entry.threat_type,
        "first_seen": iso(entry.first_seen),
        "last_seen": iso(entry.last_seen),
        "violations": entry.violations,
        "messages": entry.messages,
        "rate": entry.rate,
        "status": status_now(entry, block),
        "block": block.id if block else entry.block_id,
    }


def block_json(block):
    """A block as JSON."""
    return {
        "id": block.id,
        "target": block.target,
        "type": block.threat_type,
        "action": block.action,
        "created_at": iso(block.created_at),
        "expires_at": iso(block.expires_at),
        "lifted_at": iso(block.lifted_at),
        "lift_reason": block.lift_reason,
        "created_by": block.created_by,
        "reason": block.reason,
        "offence": block.offence,
    }


def cmd_blocks(settings, args):
    """Active blocks, or every block with --all."""
    if args.all:
        query = models.Block.select().order_by(models.Block.id)
        blocks = list(query)
    else:
        blocks = service.active_blocks()
    enforcement = enforcement_json(kernelstatus.published())
    dry_run = enforcement["backend"] == "dry-run"
    rows = [block_json(b) | kernel_json(b, dry_run) for b in blocks]
    repeat = {
        "period": settings.repeat_period,
        "factor": settings.repeat_factor,
        "maximum": settings.repeat_max,
    }
    text = "\n".join(
        f"{r['target']:<24} {r['type']:<7} "
        f"{'until ' + r['expires_at'] if r['expires_at'] else 'permanent':<31} "
        f"{r['created_by']:<12} offence {r['offence']:<3} "
        f"{'lifted ' + r['lift_reason'] if r['lifted_at'] else r['kernel']:<22}  "
        f"{r['reason']}"
        for r in rows
    )
    footer = "repeat offenders: off (enforcement.repeat_period = 0)"
    if repeat["period"]:
        footer = (
            "repeat offenders: blocked again within "
            f"{format_duration(repeat['period'])}, x{repeat['factor']:g} longer "
            f"per offence, at most {format_duration(repeat['maximum'])}"
        )
    payload = {"blocks": rows, "repeat": repeat, "enforcement": enforcement}
    # the notice first, where the console shows its banner
    lines = [*enforcement_lines(enforcement), text or "no blocks", footer]
    return payload, "\n".join(lines)


def kernel_json(block, dry_run):
    """A block's kernel status as the daemon's last check found it; none if lifted."""
    if block.lifted_at is not None:
        return {"kernel": None, "kernel_checked_at": ""}
    return {
        "kernel": kernelstatus.block_status(block, dry_run),
        "kernel_checked_at": iso(block.enforced_checked_at),
    }


def name_resolver(settings):
    """The resolver for domain names typed on the command line."""
    # the DNS library loads here, not at every start of the CLI
    from appliance.resolve import NameResolver

    return NameResolver(settings.nameservers, settings.dns_timeout)


def record_report(outcomes, verb, done):
    """(refused addresses as JSON, one line each) for what a record's action did.

    `done(outcome)` ends the line of an address that was acted on. When every
    address of a name was refused, raises Refused with all the reasons.
    """
    domain = outcomes[0].domain
    named = f" ({domain})" if domain else ""
    lines = [
        f"{o.target} not {verb}: {o.refused}"
        if o.refused
        else f"{o.target}{named} {verb}{done(o)}"
        for o in outcomes
    ]
    refused = [{"target": o.target, "reason": o.refused} for o in outcomes if o.refused]
    if len(refused) == len(outcomes):
        raise service.Refused("; ".join(lines))
    return refused, "\n".join(lines)


def cmd_block(settings, args):
    """Block an IP, a CIDR or every address of a domain name by hand."""
    duration = None
    if not args.permanent:
        try:
            duration = parse_duration(args.duration)
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
    reason = args.reason or "blocked from the command line"
    record = service.sender_record(args.target)

    outcomes = lists.block_record(
        record,
        duration=duration,
        actor="cli",
        names=name_resolver(settings),
        reason=reason,
    )

    def until(outcome):
        expires_at = outcome.block.expires_at
        span = f" {format_duration(duration)}"
        return span + (f" (until {iso(expires_at)})" if expires_at else "")

    refused, text = record_report(outcomes, "blocked", until)
    if record != args.target.strip():
        prefix = record.rpartition("/")[2]
        text += f"\n(IPv6 senders are blocked per /{prefix}: {args.target} is in it)"
    blocks = [block_json(o.block) for o in outcomes if o.block]
    if outcomes[0].domain is None:
        return blocks[0], text
    return {"domain": outcomes[0].domain, "blocks": blocks, "refused": refused}, text


def cmd_unblock(settings, args):
    """Lift the block on an IP or CIDR."""
    targets = service.unblock(args.target, actor="cli")
    return {"unblocked": targets}, f"{', '.join(targets)} unblocked"


def cmd_approve(settings, args):
    """Approve an IP, a CIDR or every address of a domain name (lifts blocks)."""
    outcomes = lists.approve_record(
        args.target, actor="cli", names=name_resolver(settings)
    )

    def lifted_by(outcome):
        lifted = outcome.lifted
        if not lifted:
            return ""
        if len(lifted) > NAMED_LIFTS:
            named = ", ".join(lifted[:NAMED_LIFTS])
            return f"; {len(lifted)} blocks lifted: {named}, ... (--json lists all)"
        return f"; blocks lifted: {', '.join(lifted)}"

    refused, text = record_report(outcomes, "approved", lifted_by)
    approved = [o.target for o in outcomes if not o.refused]
    lifted = [target for o in outcomes for target in o.lifted]
    if outcomes[0].domain is None:
        return {"approved": approved[0], "lifted": lifted}, text
    payload = {"domain": outcomes[0].domain, "approved": approved, "lifted": lifted}
    return {**payload, "refused": refused}, text


def cmd_unapprove(settings, args):
    """Remove an IP or CIDR from the approved list."""
    target = service.unapprove(args.target, actor="cli")
    return {"unapproved": target}, f"{target} removed from the approved list"


def cmd_admin(settings, args):
    """Add an administrator; prints the generated password once."""
    password = service.add_admin(args.name)
    return (
        {"admin": args.name, "password": password},
        f"administrator {args.name} added; password: {password}",
    )


def cmd_token(settings, args):
    """Add, revoke or list API tokens; a new token is printed only once."""
    from appliance import api_tokens

    if args.action == "list":
        rows = [
            {
                "name": t.name,
                "created_at": iso(t.created_at),
                "last_used": iso(t.last_used),
            }
            for t in api_tokens.list_tokens()
        ]
        text = "\n".join(
            f"{r['name']:<24} {r['created_at']}  used {r['last_used'] or 'never'}"
            for r in rows
        )
        return rows, text or "no API tokens"
    if not args.name:
        raise UsageError(f"token {args.action} needs a NAME")

    try:
        if args.action == "add":
            token = api_tokens.create_token(args.name, actor="cli")
            text = f"API token {args.name}: {token}  (shown once; keep it)"
            return {"name": args.name, "token": token}, text
        api_tokens.revoke_token(args.name, actor="cli")
    except api_tokens.TokenError as exc:
        raise UsageError(str(exc)) from exc
    return {"revoked": args.name}, f"API token {args.name} revoked"


if __name__ == "__main__":
    sys.exit(main())
