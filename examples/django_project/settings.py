"""Settings of a minimal Django project that serves a shared llama-server.

The model and any other server setting come from ``LLAMA_PROC_*`` environment variables
(``LLAMA_PROC_MODEL=model.gguf``); see ``views.py``.
"""

from __future__ import annotations

import os

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-only-not-secret")
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
ROOT_URLCONF = "django_project.urls"
INSTALLED_APPS: list[str] = []
MIDDLEWARE: list[str] = []
DATABASES: dict[str, dict[str, str]] = {}
USE_TZ = True
