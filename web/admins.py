"""The Administrators page: add, remove, change passwords; never the last admin."""

from flask import Blueprint
from flask import flash
from flask import g
from flask import redirect
from flask import render_template
from flask import session
from flask import url_for
from flask_wtf import FlaskForm
from werkzeug.security import check_password_hash
from wtforms import HiddenField
from wtforms import PasswordField
from wtforms import SelectField
from wtforms import StringField
from wtforms import ValidationError
from wtforms.fields.choices import SelectChoice
from wtforms.validators import EqualTo
from wtforms.validators import InputRequired
from wtforms.validators import Length
from wtforms.validators import Regexp

from appliance import admins
from appliance import service
from appliance.models import Admin
from web import auth
from web.wording import sentence

bp = Blueprint("admins", __name__)

NAME_RULE = r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"
NAME_MESSAGE = "A name is letters, digits and underscores, not starting with a digit."
SHORT_MESSAGE = f"A password has at least {admins.SHORTEST_PASSWORD} characters."


class NewPasswordForm(FlaskForm):
    """A new password, typed twice."""

    password = PasswordField(
        "New password",
        validators=[
            InputRequired(SHORT_MESSAGE),
            Length(min=admins.SHORTEST_PASSWORD, message=SHORT_MESSAGE),
        ],
    )
    confirm = PasswordField(
        "New password again",
        validators=[EqualTo("password", message="The two passwords differ.")],
    )

    def validate_password(self, field):
        """Not a password of only spaces (the length is checked above)."""
        if len(field.data or "") >= admins.SHORTEST_PASSWORD:
            problem = admins.password_problem(field.data)
            if problem:
                raise ValidationError(sentence(problem[0].upper() + problem[1:]))


class AddAdminForm(NewPasswordForm):
    """A new administrator's name and password."""

    username = StringField(
        "Name",
        validators=[
            InputRequired("Give the new administrator a name."),
            Regexp(NAME_RULE, message=NAME_MESSAGE),
        ],
    )

    def validate_username(self, field):
        """A name nobody has yet, in any case: alice and Alice are one person."""
        taken = admins.name_taken(field.data or "")
        if taken is not None:
            raise ValidationError(f"Administrator {taken.username} already exists.")


class PasswordForm(NewPasswordForm):
    """A new password for an administrator; your own needs your current one."""

    username = SelectField("Administrator")
    current = PasswordField("Your current password (for your own)")

    def validate_current(self, field):
        """Changing your own password takes the one you have now."""
        if self.username.data != g.admin.username:
            return
        if not check_password_hash(g.admin.password_hash, field.data or ""):
            raise ValidationError("Your current password is not right.")


class RemoveForm(FlaskForm):
    """Which administrator to remove."""

    username = HiddenField()


@bp.get("/admins")
def index():
    """Administrators, and the forms to add one or change a password."""
    return render_admins()


@bp.post("/admins/add")
def add():
    """Create an administrator with the password given."""
    form = AddAdminForm(prefix="add")

    if not form.validate():
        return render_admins(add_form=form)

    actor = f"admin:{g.admin.username}"
    try:
        service.add_admin(form.username.data, form.password.data, actor=actor)
    except service.Refused as refusal:
        form.username.errors.append(sentence(str(refusal)))
        return render_admins(add_form=form)

    flash(f"Administrator {form.username.data} added.", "ok")
    return redirect(url_for("admins.index"))


@bp.post("/admins/password")
def change_password():
    """Set a new password; the administrator's other sessions end."""
    form = make_password_form(posted=True)

    if not form.validate():
        return render_admins(password_form=form)

    name = form.username.data
    try:
        ended = admins.change_password(
            name, form.password.data, actor=f"admin:{g.admin.username}"
        )
    except service.Refused as refusal:
        form.username.errors.append(sentence(str(refusal)))
        return render_admins(password_form=form)

    if name == g.admin.username:
        auth.start_session(name, not_before=ended)
        flash("Your password is changed; your other sessions have ended.", "ok")
    else:
        flash(f"The password of {name} is changed; their sessions have ended.", "ok")
    return redirect(url_for("admins.index"))


@bp.post("/admins/remove")
def remove():
    """Delete an administrator; their sessions end at once."""
    form = RemoveForm(prefix="remove")
    name = form.username.data or ""

    if not form.validate() or not name:
        form.username.errors.append("Say which administrator to remove.")
        return render_admins(remove_form=form)

    try:
        admins.remove_admin(name, actor=f"admin:{g.admin.username}")
    except service.Refused as refusal:
        form.username.errors.append(sentence(f"Not removed: {refusal}"))
        return render_admins(remove_form=form)

    flash(f"Administrator {name} removed.", "ok")
    if name == g.admin.username:
        session.clear()
        return redirect(url_for("auth.login"))
    return redirect(url_for("admins.index"))


def make_password_form(posted=False):
    """The password form, offering every administrator, you first."""
    if posted:
        form = PasswordForm(prefix="password")
    else:
        form = PasswordForm(formdata=None, prefix="password")
    names = [a.username for a in Admin.select().order_by(Admin.username)]
    names.sort(key=lambda name: name != g.admin.username)
    form.username.choices = [SelectChoice(name, name) for name in names]
    if not posted:
        form.username.data = g.admin.username
    return form


def render_admins(add_form=None, password_form=None, remove_form=None):
    """The page, with any form that was posted and its messages."""
    everyone = list(Admin.select().order_by(Admin.username))
    return render_template(
        "admins.html",
        admins=everyone,
        add_form=add_form or AddAdminForm(formdata=None, prefix="add"),
        password_form=password_form or make_password_form(),
        remove_form=remove_form or RemoveForm(formdata=None, prefix="remove"),
        shortest=admins.SHORTEST_PASSWORD,
    )
