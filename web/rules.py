"""The Rules page: each threat type's SPEC §2 settings, and "restore defaults"."""

import re
from dataclasses import asdict

from flask import Blueprint
from flask import current_app
from flask import flash
from flask import g
from flask import redirect
from flask import render_template
from flask import url_for
from flask_wtf import FlaskForm
from wtforms import BooleanField
from wtforms import SelectField
from wtforms import StringField
from wtforms import ValidationError
from wtforms.fields.choices import SelectChoice

from appliance import rules
from appliance import service
from appliance.config import THREAT_TYPES
from appliance.timefmt import format_duration
from appliance.timefmt import parse_duration
from web.wording import sentence

bp = Blueprint("rules", __name__)

MEANINGS = {
    "spam": "the scanner's verdict is spam",
    "virus": "the scanner found malware",
    "dha": "directory harvest: the transaction named recipients that do not exist",
    "bounce": "bounced-mail attack: a delivery status notification (null sender)",
}
# a rate as typed: ASCII digits, a decimal part, a percent sign (20, 12.5%)
PERCENT = re.compile(r"\d{1,3}(?:\.\d{1,6})?%?", re.ASCII)
ACTION_CHOICES = [
    SelectChoice("temporary", "Block temporarily"),
    SelectChoice("permanent", "Block permanently"),
    SelectChoice("monitor", "Monitor only"),
]


class RuleForm(FlaskForm):
    """One rule's settings; `values` holds them parsed once the form validates."""

    enabled = BooleanField("Enabled")
    window = StringField("Window", description="1 minute to 30 days: 30m, 1h, 2d")
    rate = StringField("Rate (%)", description="above this percent, 0 to 100")
    messages = StringField("Messages", description="above this many, 0 or more")
    action = SelectField("Action", choices=ACTION_CHOICES)
    duration = StringField("Block for", description="1 second to 30 days: 1h, 7d")
    recipients = StringField("Recipients", description="above this many, 0 or more")
    unknown_recipients = StringField(
        "Unknown recipients", description="above this many, 0 or more"
    )

    def validate_window(self, field):
        """A duration from 1 minute to 30 days."""
        self.values["window"] = duration_in(field, rules.SHORTEST_WINDOW)

    def validate_duration(self, field):
        """A duration from 1 second to 30 days."""
        self.values["duration"] = duration_in(field, 1)

    def validate_rate(self, field):
        """A percentage: ASCII digits, an optional decimal part and % sign."""
        text = (field.data or "").strip()
        rate = float(text.rstrip("%")) if PERCENT.fullmatch(text) else None
        if rate is None or not 0 <= rate <= 100:
            raise ValidationError("Write a number from 0 to 100, such as 20.")
        self.values["rate"] = rate

    def validate_messages(self, field):
        """A count."""
        self.values["messages"] = count_in(field)

    def validate_recipients(self, field):
        """A count (the dha rule only)."""
        self.values["recipients"] = count_in(field)

    def validate_unknown_recipients(self, field):
        """A count (the dha rule only)."""
        self.values["unknown_recipients"] = count_in(field)

    def validate(self, extra_validators=None):
        """Check every field; `values` then holds the rule's new settings."""
        self.values = {"enabled": self.enabled.data, "action": self.action.data}
        return super().validate(extra_validators)


def duration_in(field, shortest):
    """A duration field's seconds, from `shortest` to 30 days."""
    try:
        seconds = parse_duration(field.data)
    except ValueError:
        seconds = None
    if seconds is None or not shortest <= seconds <= rules.LONGEST_TIME:
        low = format_duration(shortest)
        raise ValidationError(
            f"Write a duration from {low} to 30d, such as 30m, 1h or 2d."
        )
    return seconds


def count_in(field):
    """A count field's whole number, 0 or more."""
    text = (field.data or "").strip()
    if not (text.isascii() and text.isdigit() and len(text) <= 9):
        raise ValidationError("Write a whole number, 0 or more.")
    return int(text)


def form_for(rule, posted=False):
    """The form of one stored rule, or of what was posted for it."""
    stored = shown(rule.__data__)
    if posted:
        form = RuleForm(prefix=rule.threat_type, data=stored)
    else:
        form = RuleForm(formdata=None, prefix=rule.threat_type, data=stored)
    if rule.threat_type != "dha":
        # the dha-only settings keep their stored values on the other rules
        del form.recipients
        del form.unknown_recipients
    return form


def shown(values):
    """A rule's settings as the form shows them: durations as 1h, rate as 20."""
    return {
        "enabled": values["enabled"],
        "window": format_duration(int(values["window"])),
        "rate": f"{values['rate']:g}",
        "messages": str(values["messages"]),
        "action": values["action"],
        "duration": format_duration(int(values["duration"])),
        "recipients": str(values["recipients"]),
        "unknown_recipients": str(values["unknown_recipients"]),
    }


@bp.get("/rules")
def index():
    """Every rule's form."""
    return render_rules({})


@bp.post("/rules/<threat_type>")
def save(threat_type):
    """Store one rule's posted settings, or show what is wrong with them."""
    if threat_type not in THREAT_TYPES:
        flash(f"{threat_type[:40]!r} is not a threat type.", "refused")
        return redirect(url_for("rules.index"))
    rule = rules.current(threat_type)
    form = form_for(rule, posted=True)

    if not form.validate():
        return render_rules({threat_type: form})

    values = {
        "recipients": rule.recipients,
        "unknown_recipients": rule.unknown_recipients,
    }
    values.update(form.values)
    try:
        changes = rules.save(threat_type, values, actor=f"admin:{g.admin.username}")
    except service.Refused as refusal:
        flash(sentence(f"Not saved: {refusal}"), "refused")
        return render_rules({threat_type: form})

    if changes:
        flash(f"The {threat_type} rule is saved: {changes}.", "ok")
    else:
        flash(f"The {threat_type} rule is unchanged.", "ok")
    return redirect(url_for("rules.index", _anchor=f"rule-{threat_type}"))


@bp.post("/rules/<threat_type>/defaults")
def restore(threat_type):
    """Put one rule back to the config file's seed values."""
    if threat_type not in THREAT_TYPES:
        flash(f"{threat_type[:40]!r} is not a threat type.", "refused")
        return redirect(url_for("rules.index"))
    settings = current_app.extensions["settings"]

    actor = f"admin:{g.admin.username}"
    changes = rules.restore_defaults(threat_type, settings, actor=actor)

    if changes:
        flash(f"The {threat_type} rule is back to its defaults: {changes}.", "ok")
    else:
        flash(f"The {threat_type} rule already has its default settings.", "ok")
    return redirect(url_for("rules.index", _anchor=f"rule-{threat_type}"))


def render_rules(posted):
    """The page: the posted form (with its messages) or the stored rule, per type."""
    settings = current_app.extensions["settings"]
    sections = []
    for threat_type in THREAT_TYPES:
        form = posted.get(threat_type) or form_for(rules.current(threat_type))
        defaults = shown(asdict(settings.rule_defaults(threat_type)))
        sections.append((threat_type, MEANINGS[threat_type], form, defaults))
    return render_template("rules.html", sections=sections)
