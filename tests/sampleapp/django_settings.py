"""Django settings of the sample application: one PostgreSQL database, DATABASE_URL.

Run with ``DJANGO_SETTINGS_MODULE=django_settings``. Only the Django side imports Django:
``models``, ``shop`` and ``shop_async`` work without it installed.
"""

from __future__ import annotations

import os
from urllib.parse import parse_qs, urlsplit

# postgresql://user:password@host:port/name, or a socket directory as ?host=/path&port=5432
# (what dj-database-url does, in the few lines this application needs).
_url = urlsplit(os.environ["DATABASE_URL"])
_query = parse_qs(_url.query)

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",  # psycopg 3 from Django 4.2 on
        "NAME": _url.path.lstrip("/"),
        "USER": _url.username or "",
        "PASSWORD": _url.password or "",
        "HOST": _url.hostname or _query.get("host", [""])[0],
        "PORT": str(_url.port or _query.get("port", [""])[0]),
    }
}
INSTALLED_APPS: list[str] = []
USE_TZ = True
