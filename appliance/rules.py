"""Changing the profiler's rules (SPEC §2) from the console; every change audited.

The daemon re-reads the rules from the database every few seconds
(`Daemon.tick`), so a saved rule applies to the next events without a restart.
"""

import logging
from dataclasses import asdict
from dataclasses import fields

from appliance import service
from appliance.config import ACTIONS
from appliance.config import THREAT_TYPES
from appliance.config import RuleDefaults
from appliance.models import Rule
from appliance.models import db
from appliance.timefmt import format_duration

log = logging.getLogger(__name__)

SETTINGS = tuple(f.name for f in fields(RuleDefaults))
SHORTEST_WINDOW = 60
LONGEST_TIME = 30 * 86400
# the settings only the directory-harvest rule has
DHA_ONLY = ("recipients", "unknown_recipients")


def current(threat_type):
    """A threat type's rule as stored."""
    return Rule.get_by_id(threat_type)


def check(values):
    """Reasons, by setting, why rule values break the SPEC §2 limits."""
    problems = {}
    if not SHORTEST_WINDOW <= values["window"] <= LONGEST_TIME:
        problems["window"] = "the window is from 1 minute to 30 days"
    if not 0 <= values["rate"] <= 100:
        problems["rate"] = "the rate is a percentage from 0 to 100"
    for name in ("messages", *DHA_ONLY):
        if values[name] < 0:
            problems[name] = "this count is 0 or more"
    if values["action"] not in ACTIONS:
        problems["action"] = f"the action is one of {', '.join(ACTIONS)}"
    if not 0 < values["duration"] <= LONGEST_TIME:
        problems["duration"] = "a temporary block lasts from 1 second to 30 days"
    return problems


def save(threat_type, values, *, actor):
    """Store new values for a rule; returns the changes as text ('' if none).

    Raises service.Refused when a value is out of bounds.
    """
    if threat_type not in THREAT_TYPES:
        raise service.Refused(f"{threat_type!r} is not a threat type")
    values = {name: values[name] for name in SETTINGS}
    problems = check(values)
    if problems:
        name, problem = next(iter(problems.items()))
        raise service.Refused(f"{threat_type} {name}: {problem}")

    with db.atomic():
        rule = current(threat_type)
        changes = describe_changes(rule, values)
        if changes:
            Rule.update(**values).where(Rule.threat_type == threat_type).execute()
            service.audit(actor, "rule change", threat_type, changes)
    if changes:
        log.info("%s rule changed by %s: %s", threat_type, actor, changes)
    return changes


def restore_defaults(threat_type, settings, *, actor):
    """Put a rule back to the config file's seed values; returns the changes."""
    defaults = asdict(settings.rule_defaults(threat_type))
    return save(threat_type, defaults, actor=actor)


def describe_changes(rule, values):
    """What differs between a stored rule and new values: `rate 20 → 50, ...`."""
    changes = []
    for name in SETTINGS:
        before, after = getattr(rule, name), values[name]
        if before != after:
            changes.append(f"{name} {shown(name, before)} → {shown(name, after)}")
    return ", ".join(changes)


def shown(name, value):
    """A setting as an administrator reads it: 1h, 20%, on."""
    if name in ("window", "duration"):
        return format_duration(int(value))
    if name == "rate":
        return f"{value:g}%"
    if name == "enabled":
        return "on" if value else "off"
    return str(value)
