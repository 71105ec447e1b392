"""``LlamaServerArgs``: what to run, validated, and the one place that builds argv."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import attrs

from .errors import ConfigError

__all__ = ["FlagDialect", "LlamaServerArgs"]

CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")
POOLING_TYPES = ("none", "mean", "cls", "last", "rank")
FLASH_ATTN_VALUES = ("on", "off", "auto")

_HOST_PORT_RE = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")


@attrs.frozen
class FlagDialect:
    """How a given ``llama-server`` build spells the flags whose spelling changed over time.

    The default is the newest spelling; :func:`llama_proc.server.flag_dialect` derives one from an
    executable's ``--help``.
    """

    #: ``--load-mode mmap|none|mlock|mmap+mlock`` (newer) instead of ``--mlock`` / ``--no-mmap`` (older).
    load_mode: bool = True
    #: ``--flash-attn on|off|auto`` (newer) instead of a bare ``--flash-attn`` switch (older).
    flash_attn_value: bool = True
    #: The flag that turns the web UI off: ``--no-webui`` (both spellings are accepted by newer builds).
    no_webui: str = "--no-webui"
    #: The flag that turns the web UI on, or None where the build has none.
    webui: str | None = "--webui"


def _to_path(value: Any) -> Any:
    if isinstance(value, (str, os.PathLike)):
        return Path(value).expanduser()
    return value


def _to_optional_path(value: Any) -> Any:
    return None if value is None else _to_path(value)


def _to_tuple(value: Any) -> Any:
    if value is None:
        return ()
    if isinstance(value, (str, bytes)):
        return value  # reported by problems(): a string is not a list of strings
    try:
        return tuple(value)
    except TypeError:
        return value


def _to_flash_attn(value: Any) -> Any:
    if value is True:
        return "on"
    if value is False:
        return "off"
    if isinstance(value, str):
        return value.strip().lower()
    return value


def _flag(name: str, kind: str = "value") -> dict[str, str]:
    return {"flag": name, "kind": kind}


@attrs.frozen(kw_only=True)
class LlamaServerArgs:
    """Everything needed to run one ``llama-server``.

    Construct with keywords; fields left as ``None`` (or ``False`` for plain switches) add nothing to the
    command line, so llama-server's own default applies. Derive changed copies with :func:`attrs.evolve`
    or :meth:`evolve`.

    :raises ConfigError: listing every invalid field at once.
    """

    model: Path = attrs.field(converter=_to_path, metadata=_flag("--model"))
    alias: Optional[str] = attrs.field(default=None, metadata=_flag("--alias"))
    api_key: Optional[str] = attrs.field(
        default=None, repr=lambda v: "None" if v is None else "'***'", metadata=_flag("--api-key")
    )
    host: str = attrs.field(default="127.0.0.1", metadata=_flag("--host"))
    port: Optional[int] = attrs.field(default=None, metadata=_flag("--port"))
    n_ctx: Optional[int] = attrs.field(default=None, metadata=_flag("--ctx-size"))
    n_predict: Optional[int] = attrs.field(default=None, metadata=_flag("--n-predict"))
    n_parallel: Optional[int] = attrs.field(default=None, metadata=_flag("--parallel"))
    n_gpu_layers: Optional[int] = attrs.field(default=None, metadata=_flag("--n-gpu-layers"))
    threads: Optional[int] = attrs.field(default=None, metadata=_flag("--threads"))
    threads_batch: Optional[int] = attrs.field(default=None, metadata=_flag("--threads-batch"))
    batch_size: Optional[int] = attrs.field(default=None, metadata=_flag("--batch-size"))
    ubatch_size: Optional[int] = attrs.field(default=None, metadata=_flag("--ubatch-size"))
    flash_attn: Optional[str] = attrs.field(
        default=None, converter=_to_flash_attn, metadata=_flag("--flash-attn", "special")
    )
    cont_batching: Optional[bool] = attrs.field(default=None, metadata=_flag("--cont-batching", "tristate"))
    mlock: Optional[bool] = attrs.field(default=None, metadata=_flag("--mlock", "special"))
    mmap: Optional[bool] = attrs.field(default=None, metadata=_flag("--mmap", "special"))
    cache_type_k: Optional[str] = attrs.field(default=None, metadata=_flag("--cache-type-k"))
    cache_type_v: Optional[str] = attrs.field(default=None, metadata=_flag("--cache-type-v"))
    seed: Optional[int] = attrs.field(default=None, metadata=_flag("--seed"))
    jinja: Optional[bool] = attrs.field(default=None, metadata=_flag("--jinja", "tristate"))
    chat_template: Optional[str] = attrs.field(default=None, metadata=_flag("--chat-template"))
    chat_template_file: Optional[Path] = attrs.field(
        default=None, converter=_to_optional_path, metadata=_flag("--chat-template-file")
    )
    embeddings: bool = attrs.field(default=False, metadata=_flag("--embeddings", "switch"))
    pooling: Optional[str] = attrs.field(default=None, metadata=_flag("--pooling"))
    reranking: bool = attrs.field(default=False, metadata=_flag("--reranking", "switch"))
    metrics: bool = attrs.field(default=False, metadata=_flag("--metrics", "switch"))
    slots: Optional[bool] = attrs.field(default=None, metadata=_flag("--slots", "tristate"))
    webui: Optional[bool] = attrs.field(default=None, metadata=_flag("--webui", "special"))
    verbose: bool = attrs.field(default=False, metadata=_flag("--verbose", "switch"))
    rpc: tuple[str, ...] = attrs.field(default=(), converter=_to_tuple, metadata=_flag("--rpc", "special"))
    extra_args: tuple[str, ...] = attrs.field(default=(), converter=_to_tuple, metadata=_flag("", "special"))

    def __attrs_post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ConfigError(problems)

    # -- validation ---------------------------------------------------------------------------

    def problems(self) -> list[str]:
        """Every problem with these values, one line each (empty when valid)."""
        out: list[str] = []

        def check_int(name: str, low: int | None, high: int | None = None) -> None:
            value = getattr(self, name)
            if value is None:
                return
            if isinstance(value, bool) or not isinstance(value, int):
                out.append(f"{name}: expected an integer, got {value!r}")
            elif (low is not None and value < low) or (high is not None and value > high):
                bounds = f">= {low}" if high is None else f"between {low} and {high}"
                out.append(f"{name}: must be {bounds}, got {value}")

        def check_str(name: str, choices: Sequence[str] | None = None, allow_empty: bool = False) -> None:
            value = getattr(self, name)
            if value is None:
                return
            if not isinstance(value, str):
                out.append(f"{name}: expected a string, got {value!r}")
            elif choices is not None and value not in choices:
                out.append(f"{name}: {value!r} is not one of {', '.join(choices)}")
            elif not allow_empty and not value.strip():
                out.append(f"{name}: must not be empty")

        def check_bool(name: str, optional: bool) -> None:
            value = getattr(self, name)
            if value is None and optional:
                return
            if not isinstance(value, bool):
                out.append(f"{name}: expected True or False{' or None' if optional else ''}, got {value!r}")

        if not isinstance(self.model, Path):
            out.append(f"model: expected a path, got {self.model!r}")
        elif not str(self.model).strip() or str(self.model) == ".":
            out.append("model: must name a .gguf file")
        check_str("alias")
        check_str("api_key")
        if isinstance(self.api_key, str) and any(c.isspace() for c in self.api_key):
            out.append("api_key: must not contain whitespace")
        check_str("host")
        check_int("port", 1, 65535)
        check_int("n_ctx", 0)
        check_int("n_predict", -2)
        check_int("n_parallel", 1)
        check_int("n_gpu_layers", -1)
        check_int("threads", -1)
        check_int("threads_batch", -1)
        check_int("batch_size", 1)
        check_int("ubatch_size", 1)
        check_str("flash_attn", FLASH_ATTN_VALUES)
        for name in ("cont_batching", "mlock", "mmap", "jinja", "slots", "webui"):
            check_bool(name, optional=True)
        for name in ("embeddings", "reranking", "metrics", "verbose"):
            check_bool(name, optional=False)
        check_str("cache_type_k", CACHE_TYPES)
        check_str("cache_type_v", CACHE_TYPES)
        check_int("seed", -1, 2**32 - 1)
        check_str("chat_template")
        if self.chat_template_file is not None and not isinstance(self.chat_template_file, Path):
            out.append(f"chat_template_file: expected a path, got {self.chat_template_file!r}")
        if self.chat_template is not None and self.chat_template_file is not None:
            out.append("chat_template, chat_template_file: give one of them, not both")
        check_str("pooling", POOLING_TYPES)
        if (
            isinstance(self.batch_size, int)
            and isinstance(self.ubatch_size, int)
            and self.ubatch_size > self.batch_size
        ):
            out.append(f"ubatch_size: must not exceed batch_size ({self.ubatch_size} > {self.batch_size})")
        if not isinstance(self.rpc, tuple):
            out.append(f"rpc: expected a list of host:port strings, got {self.rpc!r}")
        else:
            for item in self.rpc:
                match = _HOST_PORT_RE.match(item) if isinstance(item, str) else None
                if match is None or not 0 < int(match.group(2)) < 65536:
                    out.append(f"rpc: {item!r} is not host:port")
        if not isinstance(self.extra_args, tuple) or not all(isinstance(a, str) for a in self.extra_args):
            out.append(f"extra_args: expected a list of strings, got {self.extra_args!r}")
        return out

    # -- argv ---------------------------------------------------------------------------------

    def to_args(self, dialect: FlagDialect | None = None) -> list[str]:
        """The exact argv (without the executable) for these settings.

        :param dialect: the flag spellings of the target build; the newest by default.
        """
        d = dialect or FlagDialect()
        argv: list[str] = []
        if self.alias is not None:
            argv += ["--alias", self.alias]
        argv += ["--model", str(self.model)]
        if self.embeddings:
            argv.append("--embeddings")
        if self.api_key is not None:
            argv += ["--api-key", self.api_key]
        argv += ["--host", self.host]
        if self.port is not None:
            argv += ["--port", str(self.port)]
        handled = {"model", "alias", "embeddings", "api_key", "host", "port"}
        for field in attrs.fields(type(self)):
            if field.name in handled:
                continue
            value = getattr(self, field.name)
            flag = field.metadata["flag"]
            kind = field.metadata["kind"]
            if kind == "value":
                if value is not None:
                    argv += [flag, str(value)]
            elif kind == "switch":
                if value:
                    argv.append(flag)
            elif kind == "tristate":
                if value is not None:
                    argv.append(flag if value else "--no-" + flag[2:])
            else:
                argv += self._special(field.name, d)
        return argv

    def _special(self, name: str, d: FlagDialect) -> list[str]:
        if name == "flash_attn":
            if self.flash_attn is None:
                return []
            if d.flash_attn_value:
                return ["--flash-attn", self.flash_attn]
            return ["--flash-attn"] if self.flash_attn == "on" else []
        if name == "mmap":
            if d.load_mode:
                mode = _load_mode(self.mmap, self.mlock)
                return [] if mode is None else ["--load-mode", mode]
            return ["--no-mmap"] if self.mmap is False else []
        if name == "mlock":
            return ["--mlock"] if self.mlock and not d.load_mode else []
        if name == "webui":
            if self.webui is None:
                return []
            if self.webui:
                return [d.webui] if d.webui else []
            return [d.no_webui]
        if name == "rpc":
            return ["--rpc", ",".join(self.rpc)] if self.rpc else []
        if name == "extra_args":
            return list(self.extra_args)
        raise AssertionError(name)  # pragma: no cover

    # -- conversions --------------------------------------------------------------------------

    def evolve(self, **changes: Any) -> LlamaServerArgs:
        """A copy with ``changes`` applied (validated like a new instance)."""
        return attrs.evolve(self, **changes)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LlamaServerArgs:
        """Build from a plain mapping (a parsed JSON/TOML/INI section). Unknown keys are errors.

        :raises ConfigError: naming every bad or unknown key.
        """
        from ._convert import structure_args

        return structure_args(data)

    def to_dict(self, *, include_secrets: bool = False) -> dict[str, Any]:
        """A plain JSON-ready mapping of the fields that are set.

        :param include_secrets: include ``api_key`` as it is; by default it is replaced by ``"***"``.
        """
        from ._convert import unstructure_args

        return unstructure_args(self, include_secrets=include_secrets)

    @classmethod
    def from_env(cls, prefix: str = "LLAMA_PROC_", environ: Mapping[str, str] | None = None) -> LlamaServerArgs:
        """Build from environment variables named ``{prefix}{FIELD}`` (``LLAMA_PROC_MODEL``, ``LLAMA_PROC_N_CTX``).

        Booleans accept ``1/0``, ``true/false``, ``yes/no``, ``on/off``; ``rpc`` is comma-separated;
        ``extra_args`` is split like a shell command line.

        :raises ConfigError: naming every bad variable.
        """
        from ._convert import args_from_env

        return args_from_env(prefix, os.environ if environ is None else environ)


def _load_mode(mmap: bool | None, mlock: bool | None) -> str | None:
    if mmap is None and mlock is None:
        return None
    if mlock:
        return "mlock" if mmap is False else "mmap+mlock"
    return "none" if mmap is False else "mmap"
