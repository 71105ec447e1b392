"""WSGI entry point: ``gunicorn --chdir examples --threads 8 django_project.wsgi`` (set LLAMA_PROC_MODEL)."""

from __future__ import annotations

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "django_project.settings")
application = get_wsgi_application()
