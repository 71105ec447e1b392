"""``python -m llama_proc``: the same as the ``llama-proc`` command."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
