"""Text settings (the sections of an INI file) -> configs, through :meth:`LlamaServerArgs.from_dict`."""

from __future__ import annotations

from typing import Mapping

from .config import LlamaServerArgs, text_value
from .errors import ConfigError


def args_from_strings(values: Mapping[str, str], where: str = "") -> LlamaServerArgs:
    """Text settings (an INI section) -> :class:`LlamaServerArgs`; problems are prefixed with ``where``."""
    data = {key: text_value(key, value, f"{where}{key}") for key, value in values.items()}
    try:
        return LlamaServerArgs.from_dict(data)
    except ConfigError as exc:
        raise ConfigError([where + p for p in exc.problems]) from None
