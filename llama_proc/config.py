"""``LlamaServerArgs``: what to run, validated, the one place that builds argv, and the one cattrs
converter between plain data (a mapping, the environment) and configs."""

from __future__ import annotations

import functools
import os
import re
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence, Union

import attrs

from .errors import ConfigError

if TYPE_CHECKING:
    import cattrs

__all__ = ["FlagDialect", "LlamaServerArgs"]

CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")
POOLING_TYPES = ("none", "mean", "cls", "last", "rank")
FLASH_ATTN_VALUES = ("on", "off", "auto")

_HOST_PORT_RE = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")


@attrs.frozen
class FlagDialect:
    """How a given ``llama-server`` build spells the flags whose spelling changed over time.

    The default is the newest spelling; :func:`llama_proc.versions.flag_dialect` derives one from an
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
    #: ``--api-key-file FNAME`` exists (newer), so the key need not be on the command line.
    api_key_file: bool = True


_REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_SPEC_RE = re.compile(
    r"^hf://(?P<repo>[^/@:]+/[^/@:]+)(?:@(?P<rev>[^/:@]+))?(?:/(?P<file>[^@]+)|:(?P<quant>[^/:@]+))?$"
)


@attrs.frozen
class HubModel:
    """A GGUF model in a Hugging Face model repository, as a spec names it (``hf://org/repo:Q4_K_M``;
    :mod:`llama_proc.models` lists the forms, and downloads it).

    Give ``filename`` or ``quant``, or neither when the repository holds one GGUF model.
    """

    repo_id: str
    filename: Optional[str] = None
    quant: Optional[str] = None
    revision: Optional[str] = None

    def __attrs_post_init__(self) -> None:
        if not _REPO_RE.match(self.repo_id):
            raise ValueError(f"expected a repository as org/name, got {self.repo_id!r}")
        if self.filename is not None and self.quant is not None:
            raise ValueError("give a file name or a quantization, not both")
        if self.filename is not None and not self.filename.lower().endswith(".gguf"):
            raise ValueError(f"expected a .gguf file in the repository, got {self.filename!r}")

    @classmethod
    def parse(cls, spec: str) -> HubModel:
        """``hf://org/repo[@revision][/file.gguf | :QUANT]`` -> :class:`HubModel`.

        :raises ValueError: saying what is wrong with ``spec``.
        """
        match = _SPEC_RE.match(spec.strip())
        if match is None:
            raise ValueError(
                f"expected hf://org/repo, hf://org/repo:QUANT or hf://org/repo/file.gguf (@revision after the "
                f"repository), got {spec!r}"
            )
        return cls(match["repo"], match["file"], match["quant"], match["rev"])

    def __str__(self) -> str:
        return "hf://" + self.ref

    @property
    def ref(self) -> str:
        """The spec without ``hf://`` (``org/repo:Q4_K_M``): the server's model name unless an alias is set."""
        text = self.repo_id + (f"@{self.revision}" if self.revision else "")
        if self.filename:
            return f"{text}/{self.filename}"
        return f"{text}:{self.quant}" if self.quant else text

    @property
    def name(self) -> str:
        """A short name, as ``Path.name`` is for a file: the file's name, else ``repo:QUANT``, else the repo."""
        if self.filename:
            return self.filename.rsplit("/", 1)[-1]
        repo = self.repo_id.split("/", 1)[1]
        return f"{repo}:{self.quant}" if self.quant else repo


def _to_path(value: Any) -> Any:
    if isinstance(value, (str, os.PathLike)):
        return Path(value).expanduser()
    return value


def _to_model(value: Any) -> Any:
    """A path, or an ``hf://`` spec as a :class:`~llama_proc.models.HubModel` (a malformed spec stays
    a string, for the validator to report)."""
    if isinstance(value, str) and _looks_like_spec(value):
        try:
            return HubModel.parse(value)
        except ValueError:
            return value
    return _to_path(value)


def _looks_like_spec(value: str) -> bool:
    """``hf://...``, and its misspellings (``HF://``, ``hf:/``), which are reported, not taken as paths."""
    return value.strip().lower().startswith("hf:")


def _to_optional_path(value: Any) -> Any:
    return None if value is None else _to_path(value)


def _to_tuple(value: Any) -> Any:
    if value is None:
        return ()
    if isinstance(value, (str, bytes)):
        return value  # reported by the field's validator: a string is not a list of strings
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


# -- validation ---------------------------------------------------------------------------------
#
# Every field carries its validator, but these validators report instead of raising: attrs runs
# them one after another, and the first to raise would hide the problems of the fields after it,
# while a ConfigError names every bad field at once. What they report about an instance being built
# is kept here under the instance's id() until its __attrs_post_init__ raises it all together.

_found: dict[int, list[str]] = {}

_Validator = Callable[[Any, "attrs.Attribute[Any]", Any], None]


def _report(inst: object, problem: str) -> None:
    _found.setdefault(id(inst), []).append(problem)


def _model_path(inst: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if isinstance(value, HubModel):
        return
    if isinstance(value, str) and _looks_like_spec(value):
        try:
            HubModel.parse(value)
        except ValueError as exc:
            _report(inst, f"{attribute.name}: {exc}")
        return
    if not isinstance(value, Path):
        _report(inst, f"{attribute.name}: expected a path or an hf:// spec, got {value!r}")
    elif not str(value).strip() or str(value) == ".":
        _report(inst, f"{attribute.name}: must name a .gguf file")


def _optional_path(inst: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and not isinstance(value, Path):
        _report(inst, f"{attribute.name}: expected a path, got {value!r}")


def _int(low: int | None, high: int | None = None) -> _Validator:
    """An integer (or None) of at least ``low`` and at most ``high``; a bool is no integer here."""

    def check(inst: object, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, int):
            _report(inst, f"{attribute.name}: expected an integer, got {value!r}")
        elif (low is not None and value < low) or (high is not None and value > high):
            bounds = f">= {low}" if high is None else f"between {low} and {high}"
            _report(inst, f"{attribute.name}: must be {bounds}, got {value}")

    return check


def _str(choices: Sequence[str] | None = None) -> _Validator:
    """A string (or None): one of ``choices`` when given, else not blank."""

    def check(inst: object, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is None:
            return
        if not isinstance(value, str):
            _report(inst, f"{attribute.name}: expected a string, got {value!r}")
        elif choices is not None and value not in choices:
            _report(inst, f"{attribute.name}: {value!r} is not one of {', '.join(choices)}")
        elif not value.strip():
            _report(inst, f"{attribute.name}: must not be empty")

    return check


def _no_whitespace(inst: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if isinstance(value, str) and any(c.isspace() for c in value):
        _report(inst, f"{attribute.name}: must not contain whitespace")


def _bool(optional: bool) -> _Validator:
    """True or False, or also None when ``optional``."""

    def check(inst: object, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is None and optional:
            return
        if not isinstance(value, bool):
            _report(inst, f"{attribute.name}: expected True or False{' or None' if optional else ''}, got {value!r}")

    return check


def _not_above(other: str) -> _Validator:
    """Not more than the field ``other`` (when both are integers)."""

    def check(inst: object, attribute: attrs.Attribute[Any], value: Any) -> None:
        limit = getattr(inst, other)
        if isinstance(value, int) and isinstance(limit, int) and value > limit:
            _report(inst, f"{attribute.name}: must not exceed {other} ({value} > {limit})")

    return check


def _not_with(other: str) -> _Validator:
    """Not given together with the field ``other``."""

    def check(inst: object, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is not None and getattr(inst, other) is not None:
            _report(inst, f"{other}, {attribute.name}: give one of them, not both")

    return check


def _host_ports(inst: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, tuple):
        _report(inst, f"{attribute.name}: expected a list of host:port strings, got {value!r}")
        return
    for item in value:
        match = _HOST_PORT_RE.match(item) if isinstance(item, str) else None
        if match is None or not 0 < int(match.group(2)) < 65536:
            _report(inst, f"{attribute.name}: {item!r} is not host:port")


def _strings(inst: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, tuple) or not all(isinstance(a, str) for a in value):
        _report(inst, f"{attribute.name}: expected a list of strings, got {value!r}")


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

    #: The ``.gguf`` file, or a model on the Hugging Face hub: ``"hf://org/repo:Q4_K_M"`` (see
    #: :mod:`llama_proc.models`), downloaded into the hub's cache when the server starts (offline
    #: when it is already there).
    model: Union[Path, HubModel] = attrs.field(converter=_to_model, validator=_model_path, metadata=_flag("--model"))
    alias: Optional[str] = attrs.field(default=None, validator=_str(), metadata=_flag("--alias"))
    api_key: Optional[str] = attrs.field(
        default=None,
        validator=[_str(), _no_whitespace],
        repr=lambda v: "None" if v is None else "'***'",
        metadata=_flag("--api-key"),
    )
    host: str = attrs.field(default="127.0.0.1", validator=_str(), metadata=_flag("--host"))
    port: Optional[int] = attrs.field(default=None, validator=_int(1, 65535), metadata=_flag("--port"))
    n_ctx: Optional[int] = attrs.field(default=None, validator=_int(0), metadata=_flag("--ctx-size"))
    n_predict: Optional[int] = attrs.field(default=None, validator=_int(-2), metadata=_flag("--n-predict"))
    n_parallel: Optional[int] = attrs.field(default=None, validator=_int(1), metadata=_flag("--parallel"))
    n_gpu_layers: Optional[int] = attrs.field(default=None, validator=_int(-1), metadata=_flag("--n-gpu-layers"))
    threads: Optional[int] = attrs.field(default=None, validator=_int(-1), metadata=_flag("--threads"))
    threads_batch: Optional[int] = attrs.field(default=None, validator=_int(-1), metadata=_flag("--threads-batch"))
    threads_http: Optional[int] = attrs.field(default=None, validator=_int(1), metadata=_flag("--threads-http"))
    batch_size: Optional[int] = attrs.field(default=None, validator=_int(1), metadata=_flag("--batch-size"))
    ubatch_size: Optional[int] = attrs.field(
        default=None, validator=[_int(1), _not_above("batch_size")], metadata=_flag("--ubatch-size")
    )
    flash_attn: Optional[str] = attrs.field(
        default=None,
        converter=_to_flash_attn,
        validator=_str(FLASH_ATTN_VALUES),
        metadata=_flag("--flash-attn", "special"),
    )
    cont_batching: Optional[bool] = attrs.field(
        default=None, validator=_bool(optional=True), metadata=_flag("--cont-batching", "tristate")
    )
    mlock: Optional[bool] = attrs.field(
        default=None, validator=_bool(optional=True), metadata=_flag("--mlock", "special")
    )
    mmap: Optional[bool] = attrs.field(
        default=None, validator=_bool(optional=True), metadata=_flag("--mmap", "special")
    )
    cache_type_k: Optional[str] = attrs.field(
        default=None, validator=_str(CACHE_TYPES), metadata=_flag("--cache-type-k")
    )
    cache_type_v: Optional[str] = attrs.field(
        default=None, validator=_str(CACHE_TYPES), metadata=_flag("--cache-type-v")
    )
    seed: Optional[int] = attrs.field(default=None, validator=_int(-1, 2**32 - 1), metadata=_flag("--seed"))
    jinja: Optional[bool] = attrs.field(
        default=None, validator=_bool(optional=True), metadata=_flag("--jinja", "tristate")
    )
    chat_template: Optional[str] = attrs.field(default=None, validator=_str(), metadata=_flag("--chat-template"))
    chat_template_file: Optional[Path] = attrs.field(
        default=None,
        converter=_to_optional_path,
        validator=[_optional_path, _not_with("chat_template")],
        metadata=_flag("--chat-template-file"),
    )
    embeddings: bool = attrs.field(
        default=False, validator=_bool(optional=False), metadata=_flag("--embeddings", "switch")
    )
    pooling: Optional[str] = attrs.field(default=None, validator=_str(POOLING_TYPES), metadata=_flag("--pooling"))
    reranking: bool = attrs.field(
        default=False, validator=_bool(optional=False), metadata=_flag("--reranking", "switch")
    )
    metrics: bool = attrs.field(default=False, validator=_bool(optional=False), metadata=_flag("--metrics", "switch"))
    slots: Optional[bool] = attrs.field(
        default=None, validator=_bool(optional=True), metadata=_flag("--slots", "tristate")
    )
    webui: Optional[bool] = attrs.field(
        default=None, validator=_bool(optional=True), metadata=_flag("--webui", "special")
    )
    verbose: bool = attrs.field(default=False, validator=_bool(optional=False), metadata=_flag("--verbose", "switch"))
    rpc: tuple[str, ...] = attrs.field(
        default=(), converter=_to_tuple, validator=_host_ports, metadata=_flag("--rpc", "special")
    )
    extra_args: tuple[str, ...] = attrs.field(
        default=(), converter=_to_tuple, validator=_strings, metadata=_flag("", "special")
    )

    def __attrs_pre_init__(self) -> None:
        # an instance that once had this id but failed half-way through its validators left its problems
        _found.pop(id(self), None)

    def __attrs_post_init__(self) -> None:
        problems = _found.pop(id(self), None)
        if problems:
            raise ConfigError(problems)

    # -- validation ---------------------------------------------------------------------------

    def problems(self) -> list[str]:
        """Every problem with these values, one line each (empty when valid): what the field
        validators report, run again (:func:`attrs.validate`)."""
        _found.pop(id(self), None)
        try:
            attrs.validate(self)
        finally:
            found = _found.pop(id(self), [])
        return found

    # -- argv ---------------------------------------------------------------------------------

    def to_args(
        self, dialect: FlagDialect | None = None, *, api_key_file: str | os.PathLike[str] | None = None
    ) -> list[str]:
        """The exact argv (without the executable) for these settings.

        :param dialect: the flag spellings of the target build; the newest by default.
        :param api_key_file: a file that holds ``api_key``: passed as ``--api-key-file`` instead of
            the key itself, where the build has that flag, so the key is not in the process list.
        """
        d = dialect or FlagDialect()
        argv: list[str] = []
        if self.alias is not None:
            argv += ["--alias", self.alias]
        if isinstance(self.model, HubModel):
            raise ConfigError(
                [
                    f"model: {self.model} is found or downloaded when the server starts; for an argv, "
                    "resolve it first: args.evolve(model=llama_proc.models.resolve(args.model))"
                ]
            )
        argv += ["--model", str(self.model)]
        if self.embeddings:
            argv.append("--embeddings")
        if self.api_key is not None:
            if api_key_file is not None and d.api_key_file:
                argv += ["--api-key-file", os.fspath(api_key_file)]
            else:
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
        if not isinstance(data, Mapping):
            raise ConfigError([f"config: expected a mapping, got {type(data).__name__}"])
        known = {f.name for f in attrs.fields(cls)}
        problems = [f"{key}: unknown setting (known: {', '.join(sorted(known))})" for key in data if key not in known]
        if "model" not in data:
            problems.append("model: required")
        if problems:
            raise ConfigError(problems)
        return _structure(dict(data), cls)

    def to_dict(self, *, include_secrets: bool = False) -> dict[str, Any]:
        """A plain JSON-ready mapping of the fields that differ from their defaults.

        :param include_secrets: include ``api_key`` as it is; by default it is replaced by ``"***"``.
        """
        raw = _converter().unstructure(self)
        out: dict[str, Any] = {}
        for field in attrs.fields(type(self)):
            value = raw[field.name]
            if field.default is not attrs.NOTHING and getattr(self, field.name) == field.default:
                continue
            out[field.name] = list(value) if isinstance(value, tuple) else value
        if "api_key" in out and not include_secrets:
            out["api_key"] = "***"
        return out

    @classmethod
    def from_env(cls, prefix: str = "LLAMA_PROC_", environ: Mapping[str, str] | None = None) -> LlamaServerArgs:
        """Build from environment variables named ``{prefix}{FIELD}`` (``LLAMA_PROC_MODEL``, ``LLAMA_PROC_N_CTX``).

        Booleans accept ``1/0``, ``true/false``, ``yes/no``, ``on/off``; ``rpc`` is comma-separated;
        ``extra_args`` is split like a shell command line.

        :raises ConfigError: naming every bad variable.
        """
        env = os.environ if environ is None else environ
        data: dict[str, Any] = {}
        for field in attrs.fields(cls):
            key = prefix + field.name.upper()
            if key in env:
                data[field.name] = text_value(field.name, env[key], key)
        if "model" not in data:
            raise ConfigError([f"{prefix}MODEL: required (the path of the .gguf model, or hf://org/repo:QUANT)"])
        try:
            return cls.from_dict(data)
        except ConfigError as exc:  # "n_ctx: ..." -> "{prefix}N_CTX: ..."
            raise ConfigError(
                [
                    prefix + p.split(":", 1)[0].upper() + ":" + p.split(":", 1)[1] if ":" in p else p
                    for p in exc.problems
                ]
            ) from None


def _load_mode(mmap: bool | None, mlock: bool | None) -> str | None:
    if mmap is None and mlock is None:
        return None
    if mlock:
        return "mlock" if mmap is False else "mmap+mlock"
    return "none" if mmap is False else "mmap"


# -- plain data <-> configs: the one cattrs converter --------------------------------------------

_TRUE = {"1", "true", "yes", "on", "y", "t"}
_FALSE = {"0", "false", "no", "off", "n", "f"}


def text_value(name: str, value: str, where: str) -> Any:
    """A setting given as text (an environment variable, an INI value) as :meth:`LlamaServerArgs.from_dict`
    takes it: ``rpc`` split at commas, ``extra_args`` split like a shell command line, any other as it is
    (the converter parses numbers and booleans). ``where`` names the setting in a problem."""
    if name == "rpc":
        return [item.strip() for item in value.split(",") if item.strip()]
    if name == "extra_args":
        try:
            return shlex.split(value)
        except ValueError as exc:
            raise ConfigError([f"{where}: cannot be split like a command line ({exc})"]) from None
    return value


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
        try:
            return int(value.strip())
        except ValueError:
            raise ValueError(f"expected an integer, got {value!r}") from None
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


def _structure_model(value: Any, _type: Any) -> Path | HubModel:
    if isinstance(value, HubModel):
        return value
    if isinstance(value, str) and _looks_like_spec(value):
        return HubModel.parse(value)  # its ValueError says "expected hf://org/repo, ..."
    if isinstance(value, (str, Path)):
        return Path(value)
    raise ValueError(f"expected a path or an hf:// spec, got {value!r}")


@functools.cache
def _converter() -> cattrs.Converter:
    import cattrs  # loaded with the first conversion, not with the package

    conv = cattrs.Converter(forbid_extra_keys=True)
    conv.register_structure_hook(bool, _structure_bool)
    conv.register_structure_hook(int, _structure_int)
    conv.register_structure_hook(str, _structure_str)
    conv.register_structure_hook(Path, _structure_path)
    conv.register_unstructure_hook(Path, str)
    conv.register_structure_hook(Union[Path, HubModel], _structure_model)
    conv.register_unstructure_hook(HubModel, str)
    return conv


def _structure(data: dict[str, Any], cls: type[LlamaServerArgs]) -> LlamaServerArgs:
    """``data`` (known keys only) -> ``cls``, every problem reported at once as a :class:`ConfigError`."""
    import cattrs

    try:
        return _converter().structure(data, cls)
    except ConfigError:  # from the validators: already one line per problem
        raise
    except cattrs.BaseValidationError as exc:
        # the values were parsed but the validators refused them: cattrs hands on their ConfigError
        # as the one error of the class
        refused = [problem for error in exc.exceptions if isinstance(error, ConfigError) for problem in error.problems]
        if refused:
            raise ConfigError(refused) from None
        raise ConfigError(_parse_problems(exc)) from None
    except (ValueError, TypeError) as exc:
        raise ConfigError(_parse_problems(exc)) from None


def _parse_problems(exc: BaseException) -> list[str]:
    """The problems cattrs found parsing values, one line each, named by setting."""
    import cattrs
    from cattrs.v import format_exception

    def describe(error: BaseException, type_: Any) -> str:
        # the converter's own hooks say what was expected and what came ("expected an integer,
        # got 'abc'"); cattrs' generic text names only the type, as "Optional" for most settings
        if isinstance(error, ValueError) and str(error).startswith("expected "):
            return str(error)
        return format_exception(error, type_)

    problems = []
    for message in cattrs.transform_error(exc, path="", format_exception=describe):
        # "invalid value for type, expected int @ $.n_ctx" -> "n_ctx: invalid value ..."
        text, _, where = message.rpartition(" @ ")
        key = where.lstrip("$").lstrip(".") or "config"
        problems.append(f"{key}: {text}" if text else message)
    return problems
