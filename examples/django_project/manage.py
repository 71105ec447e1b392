#!/usr/bin/env python
"""Django's command-line utility for this project: ``python manage.py runserver`` from ``examples/``
(with ``LLAMA_PROC_MODEL=model.gguf`` set)."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # django_project is a package there
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "django_project.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
