"""Settings read from the TOML config file, with SPEC defaults."""

import os
import re
import tomllib
from dataclasses import dataclass
from dataclasses import field
from dataclasses import fields
from dataclasses import replace
from pathlib import Path

from appliance import addresses

DEFAULT_PATHS = ("/etc/sender-filter/config.toml", "var/config.toml")
THREAT_TYPES = ("spam", "virus", "dha", "bounce")
SECTIONS = {"database", "logs", "network", "enforcement", "web", "dns", "rules"}
ACTIONS = ("temporary", "permanent", "monitor")
ENFORCEMENT_KEYS = {
    "backend",
    "ports",
    "verdict",
    "set_v4",
    "set_v6",
    "chain",
    "set_size",
    "iptables",
    "repeat_period",
    "repeat_factor",
    "repeat_max",
    "setup_request",
}
# chains iptables and ip6tables have built in: ours must never be one of them
BUILTIN_CHAINS = ("INPUT", "OUTPUT", "FORWARD", "PREROUTING", "POSTROUTING")
# words iptables reads as a verdict or target where a chain name goes
TARGET_WORDS = ("ACCEPT", "DROP", "RETURN", "QUEUE", "REJECT", "LOG")
# where Debian's iptables keeps its extensions (lib/<triplet>/xtables)
XTABLES = Path("/usr/lib")
# a chain of our own (iptables allows 28 characters); a set (ipset allows 31,
# and a rebuild fills `<first 26>-swap` before swapping it in)
CHAIN_NAME = re.compile(r"[A-Za-z0-9_-]{1,28}")
SET_NAME = re.compile(r"[A-Za-z0-9_.-]{1,31}")
# the most ports one multiport match takes
MOST_PORTS = 15


class ConfigError(Exception):
    """The config file is missing, unreadable or holds a bad value."""


@dataclass(frozen=True)
class RuleDefaults:
    """One threat type's rule as SPEC §2 sets it out; durations in seconds."""

    enabled: bool = True
    window: int = 3600
    rate: float = 20.0
    messages: int = 100
    action: str = "temporary"
    duration: int = 3600
    recipients: int = 10
    unknown_recipients: int = 5


@dataclass(frozen=True)
class Settings:
    """Everything the appliance reads from its config file."""

    path: Path
    database: Path
    log_files: tuple[str, ...] = ()
    ipv6_prefix: int = 64
    widest_v4: int = 16
    widest_v6: int = 32
    own_addresses: tuple[str, ...] = ()
    enforcement: str = "auto"
    ports: tuple[int, ...] = (25, 465, 587)
    all_ports: bool = False
    verdict: str = "REJECT"
    set_v4: str = "sender_filter_v4"
    set_v6: str = "sender_filter_v6"
    chain: str = "SENDER_FILTER"
    set_size: int = 262144
    iptables: str = "auto"
    repeat_period: int = 7 * 86400
    repeat_factor: float = 2.0
    repeat_max: int = 30 * 86400
    # written when a missing rule needs the privileged setup step (see
    # docs/enforcement.md); None: only logged and shown
    setup_request: Path | None = None
    web_host: str = "127.0.0.1"
    web_port: int = 8080
    secret_key_file: Path = Path("var/secret_key")
    session_minutes: int = 60
    https: bool = False
    proxies: int = 0
    login_failures: int = 5
    login_lockout_minutes: int = 15
    nameservers: tuple[str, ...] = ()
    dns_timeout: float = 1.0
    # domain names on the blocked and approved lists are looked up again this often
    reresolve_minutes: int = 15
    rules: dict = field(default_factory=dict)

    def rule_defaults(self, threat_type):
        """The config's seed values for a threat type's rule."""
        return self.rules.get(threat_type, RuleDefaults())


def config_path(explicit=None):
    """Pick the config file as SPEC §10 says: flag, environment, /etc, ./var."""
    if explicit:
        return Path(explicit)
    from_env = os.environ.get("SENDER_FILTER_CONFIG")
    if from_env:
        return Path(from_env)
    for candidate in DEFAULT_PATHS:
        if Path(candidate).exists():
            return Path(candidate)
    return Path(DEFAULT_PATHS[-1])


def load(explicit=None):
    """Read the config file; relative paths in it are relative to the file."""
    path = config_path(explicit)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc}") from exc
    return from_mapping(raw, path)


def from_mapping(raw, path):
    """Build Settings from a parsed TOML mapping."""
    base = path.resolve().parent

    def resolve(value):
        value = Path(value)
        return value if value.is_absolute() else base / value

    unknown = set(raw) - SECTIONS
    if unknown:
        raise ConfigError(f"unknown section [{sorted(unknown)[0]}]")
    unknown = set(raw.get("rules", {})) - set(THREAT_TYPES)
    if unknown:
        raise ConfigError(
            f"[rules.{sorted(unknown)[0]}]: threat types are {', '.join(THREAT_TYPES)}"
        )
    database = raw.get("database", {})
    logs = raw.get("logs", {})
    network = raw.get("network", {})
    enforcement = raw.get("enforcement", {})
    web = raw.get("web", {})
    dns = raw.get("dns", {})
    unknown = set(enforcement) - ENFORCEMENT_KEYS
    if unknown:
        raise ConfigError(f"enforcement.{sorted(unknown)[0]} is not a setting")
    ports = enforcement.get("ports", [25, 465, 587])
    if ports != "all" and not (
        _texts_or_ints(ports, int)
        and 1 <= len(ports) <= MOST_PORTS
        and all(1 <= p <= 65535 for p in ports)
    ):
        raise ConfigError(
            f"enforcement.ports is a list of ports 1-65535 (1 to {MOST_PORTS} of "
            'them), or "all"'
        )
    set_v4 = _name(enforcement, "set_v4", "sender_filter_v4", SET_NAME)
    set_v6 = _name(enforcement, "set_v6", "sender_filter_v6", SET_NAME)
    if set_v4[:26] == set_v6[:26]:
        # a rebuild fills `<first 26 characters>-swap`: those must differ too
        raise ConfigError(
            "enforcement.set_v4 and set_v6 must differ (in their first 26 characters)"
        )
    for key, name in (("set_v4", set_v4), ("set_v6", set_v6)):
        if name.endswith("-swap"):
            raise ConfigError(
                f"enforcement.{key} = {name!r} ends in -swap, the ending of the "
                "fresh sets a rebuild fills; choose another name"
            )
    chain = _name(enforcement, "chain", "SENDER_FILTER", CHAIN_NAME)
    if chain.upper() in BUILTIN_CHAINS:
        raise ConfigError(
            f"enforcement.chain = {chain!r} is a built-in chain; name a chain "
            "of its own, such as SENDER_FILTER"
        )
    if chain.upper() in TARGET_WORDS or chain.startswith("-") or _is_target(chain):
        raise ConfigError(
            f"enforcement.chain = {chain!r} reads as an iptables target or option; "
            "name a chain of its own, such as SENDER_FILTER"
        )
    for key, section in (
        ("logs.files", logs.get("files", [])),
        ("network.own_addresses", network.get("own_addresses", [])),
        ("dns.nameservers", dns.get("nameservers", [])),
    ):
        if not _texts_or_ints(section, str):
            raise ConfigError(f"{key} is a list of strings")
    for address in network.get("own_addresses", []):
        try:
            addresses.parse_network(address)
        except addresses.AddressError as exc:
            raise ConfigError(f"network.own_addresses: {exc}") from exc
    timeout = dns.get("timeout", 1.0)
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not (0 < timeout <= 30)
    ):
        raise ConfigError("dns.timeout is a number of seconds from 0 to 30")

    settings = Settings(
        path=path,
        database=resolve(database.get("path", "sender-filter.db")),
        log_files=tuple(str(resolve(f)) for f in logs.get("files", [])),
        ipv6_prefix=_int(network, "ipv6_prefix", 64, 16, 128),
        widest_v4=_int(network, "widest_v4", 16, 0, 32),
        widest_v6=_int(network, "widest_v6", 32, 0, 128),
        own_addresses=tuple(network.get("own_addresses", [])),
        enforcement=_choice(
            enforcement, "backend", "auto", ("auto", "kernel", "dry-run")
        ),
        ports=() if ports == "all" else tuple(int(p) for p in ports),
        all_ports=ports == "all",
        verdict=_choice(enforcement, "verdict", "REJECT", ("REJECT", "DROP")),
        set_v4=set_v4,
        set_v6=set_v6,
        chain=chain,
        set_size=_int(enforcement, "set_size", 262144, 1024, 1 << 26),
        iptables=_choice(enforcement, "iptables", "auto", ("auto", "nft", "legacy")),
        repeat_period=_int(enforcement, "repeat_period", 7 * 86400, 0, 365 * 86400),
        repeat_factor=_factor(enforcement, "repeat_factor", 2.0),
        repeat_max=_int(enforcement, "repeat_max", 30 * 86400, 1, 30 * 86400),
        setup_request=_optional_path(enforcement, "setup_request", resolve),
        web_host=web.get("host", "127.0.0.1"),
        web_port=_int(web, "port", 8080, 1, 65535),
        secret_key_file=resolve(web.get("secret_key_file", "secret_key")),
        session_minutes=_int(web, "session_minutes", 60, 1, 7 * 24 * 60),
        https=_bool(web, "https", False),
        proxies=_int(web, "proxies", 0, 0, 5),
        login_failures=_int(web, "login_failures", 5, 1, 1000),
        login_lockout_minutes=_int(web, "login_lockout_minutes", 15, 1, 24 * 60),
        nameservers=tuple(dns.get("nameservers", [])),
        dns_timeout=float(dns.get("timeout", 1.0)),
        reresolve_minutes=_int(dns, "reresolve_minutes", 15, 1, 7 * 24 * 60),
        rules={t: _rule(raw.get("rules", {}).get(t, {}), t) for t in THREAT_TYPES},
    )
    if settings.ipv6_prefix < settings.widest_v6:
        raise ConfigError(
            f"network.ipv6_prefix = {settings.ipv6_prefix} is wider than "
            f"network.widest_v6 = {settings.widest_v6}: every IPv6 block would "
            "be refused"
        )
    return settings


def _rule(raw, threat_type):
    """Rule seed values for one type, checked against the SPEC §2 limits."""
    known = {f.name for f in fields(RuleDefaults)}
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"rules.{threat_type}: unknown key {sorted(unknown)[0]}")
    rule = replace(RuleDefaults(), **raw)
    numbers = ("window", "rate", "messages", "duration", "recipients")
    for name in (*numbers, "unknown_recipients"):
        value = getattr(rule, name)
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ConfigError(f"rules.{threat_type}.{name} is a number, 0 or more")
    if rule.rate > 100:
        raise ConfigError(f"rules.{threat_type}.rate is a percentage, 0 to 100")
    if not isinstance(rule.enabled, bool):
        raise ConfigError(f"rules.{threat_type}.enabled is true or false")
    if rule.action not in ACTIONS:
        raise ConfigError(f"rules.{threat_type}.action must be one of {ACTIONS}")
    if not 0 < rule.duration <= 30 * 86400:
        raise ConfigError(f"rules.{threat_type}.duration must be 1 s to 30 days")
    if not 60 <= rule.window <= 30 * 86400:
        raise ConfigError(f"rules.{threat_type}.window must be 1 minute to 30 days")
    return rule


def _texts_or_ints(value, kind):
    """Whether a setting is a list whose items are all of one kind (not bool)."""
    return isinstance(value, list) and all(
        isinstance(item, kind) and not isinstance(item, bool) for item in value
    )


def _int(section, key, default, low, high):
    """An integer setting within [low, high]."""
    value = section.get(key, default)
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or not low <= value <= high
    ):
        raise ConfigError(f"{key} must be an integer from {low} to {high}")
    return value


def _bool(section, key, default):
    """A true-or-false setting."""
    value = section.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false")
    return value


def _factor(section, key, default):
    """A number from 1 to 100 that a duration is multiplied by."""
    value = section.get(key, default)
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not 1 <= value <= 100
    ):
        raise ConfigError(f"{key} must be a number from 1 to 100")
    return float(value)


def _name(section, key, default, pattern):
    """A chain or set name of the characters and length `pattern` allows."""
    value = section.get(key, default)
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise ConfigError(
            f"enforcement.{key} must match {pattern.pattern} (letters, digits, "
            "and the punctuation shown)"
        )
    return value


def _is_target(name):
    """Whether iptables has a target extension of this name (MARK, TEE, CT...).

    iptables refuses such a chain name when asked directly, but not in every
    path (a restore takes `-N MARK` and then `-j MARK` reads as the target).
    """
    return any(
        next(XTABLES.glob(f"*/xtables/lib{family}_{name}.so"), None)
        for family in ("xt", "ipt", "ip6t")
    )


def _optional_path(section, key, resolve):
    """A file path setting that may be left out (None), relative to the config."""
    value = section.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip() or "\0" in value:
        raise ConfigError(f"{key} must be a file path")
    return resolve(value)


def _choice(section, key, default, allowed):
    """A setting that must be one of a few words."""
    value = section.get(key, default)
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {', '.join(allowed)}")
    return value
