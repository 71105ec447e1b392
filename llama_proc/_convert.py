"""The one cattrs converter of llama_proc: plain data and environment <-> configs."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any, Mapping

import attrs
import cattrs

from .config import LlamaServerArgs
from .errors import ConfigError

_TRUE = {"1", "true", "yes", "on", "y", "t"}
_FALSE = {"0", "false", "no", "off", "n", "f"}


def _structure_bool(value: Any, _type: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    raise ValueError(f"expected a boolean (true/false, yes/no, on/off, 1/0), got {value!r}")


def _structure_int(value: Any, _type: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"expected an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        return int(value.strip())
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise ValueError(f"expected an integer, got {value!r}")


def _structure_str(value: Any, _type: Any) -> str:
    if isinstance(value, str):
        return value
    raise ValueError(f"expected a string, got {value!r}")


def _structure_path(value: Any, _type: Any) -> Path:
    if isinstance(value, (str, Path)):
        return Path(value)
    raise ValueError(f"expected a path, got {value!r}")


def _make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=True)
    conv.register_structure_hook(bool, _structure_bool)
    conv.register_structure_hook(int, _structure_int)
    conv.register_structure_hook(str, _structure_str)
    conv.register_structure_hook(Path, _structure_path)
    conv.register_unstructure_hook(Path, str)
    return conv


_converter = _make_converter()


def _flatten(exc: BaseException) -> list[str]:
    messages = cattrs.transform_error(exc, path="")
    out = []
    for message in messages:
        # "invalid value for type, expected int @ $.n_ctx" -> "n_ctx: invalid value ..."
        text, _, where = message.rpartition(" @ ")
        key = where.lstrip("$").lstrip(".") or "config"
        out.append(f"{key}: {text}" if text else message)
    return out


def structure_args(data: Mapping[str, Any]) -> LlamaServerArgs:
    """Mapping -> :class:`LlamaServerArgs`, every problem reported at once as a :class:`ConfigError`."""
    if not isinstance(data, Mapping):
        raise ConfigError([f"config: expected a mapping, got {type(data).__name__}"])
    known = {f.name for f in attrs.fields(LlamaServerArgs)}
    problems = [f"{key}: unknown setting (known: {', '.join(sorted(known))})" for key in data if key not in known]
    if "model" not in data:
        problems.append("model: required")
    if problems:
        raise ConfigError(problems)
    try:
        return _converter.structure(dict(data), LlamaServerArgs)
    except ConfigError:
        raise
    except (cattrs.BaseValidationError, ValueError, TypeError) as exc:
        raise ConfigError(_flatten(exc)) from None


def unstructure_args(args: LlamaServerArgs, *, include_secrets: bool) -> dict[str, Any]:
    """:class:`LlamaServerArgs` -> a JSON-ready dict of the fields that differ from their defaults."""
    raw = _converter.unstructure(args)
    out: dict[str, Any] = {}
    for field in attrs.fields(LlamaServerArgs):
        value = raw[field.name]
        if field.default is not attrs.NOTHING and getattr(args, field.name) == field.default:
            continue
        if isinstance(value, tuple):
            value = list(value)
        out[field.name] = value
    if "api_key" in out and not include_secrets:
        out["api_key"] = "***"
    return out


def _list_value(name: str, value: str, where: str) -> Any:
    """A text value (environment, INI) of a list field, split: ``rpc`` at commas, ``extra_args`` like a shell."""
    if name == "rpc":
        return [item.strip() for item in value.split(",") if item.strip()]
    if name == "extra_args":
        try:
            return shlex.split(value)
        except ValueError as exc:
            raise ConfigError([f"{where}: cannot be split like a command line ({exc})"]) from None
    return value


def args_from_strings(values: Mapping[str, str], where: str = "") -> LlamaServerArgs:
    """Text settings (an INI section) -> :class:`LlamaServerArgs`; problems are prefixed with ``where``."""
    data = {key: _list_value(key, value, f"{where}{key}") for key, value in values.items()}
    try:
        return structure_args(data)
    except ConfigError as exc:
        raise ConfigError([where + p for p in exc.problems]) from None


def args_from_env(prefix: str, environ: Mapping[str, str]) -> LlamaServerArgs:
    """Environment variables ``{prefix}{FIELD}`` -> :class:`LlamaServerArgs`."""
    data: dict[str, Any] = {}
    for field in attrs.fields(LlamaServerArgs):
        key = prefix + field.name.upper()
        if key in environ:
            data[field.name] = _list_value(field.name, environ[key], key)
    if "model" not in data:
        raise ConfigError([f"{prefix}MODEL: required (the path of the .gguf model)"])
    try:
        return structure_args(data)
    except ConfigError as exc:
        raise ConfigError(
            [prefix + p.upper().split(":", 1)[0] + ":" + p.split(":", 1)[1] if ":" in p else p for p in exc.problems]
        ) from None
