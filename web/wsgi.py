"""The console as a WSGI application for gunicorn: `gunicorn web.wsgi:app`.

Reads the config file `sender-filter web` would ($SENDER_FILTER_CONFIG, else
/etc/sender-filter/config.toml, else ./var/config.toml) when a worker loads it.
"""

import sys

from appliance import config
from appliance import models
from appliance import service
from web import create_app


def build_app():
    """The console for the configured appliance; exit with one line if unusable."""
    try:
        settings = config.load()
    except config.ConfigError as exc:
        sys.exit(f"sender-filter console: {exc}")
    if not settings.database.exists():
        sys.exit(
            f"sender-filter console: no database at {settings.database}: "
            "run `sender-filter init` first"
        )

    models.connect(settings.database)
    service.configure(settings)
    return create_app(settings)


app = build_app()
