"""Models from the Hugging Face hub: ``pull("org/repo", quant="Q4_K_M")`` and ``hf://`` model specs.

The download, the cache (``$HF_HOME/hub``), ``HF_HOME``/``HF_HUB_CACHE``/``HF_HUB_OFFLINE``/``HF_TOKEN``/
``HF_ENDPOINT`` and the progress bars are those of ``huggingface_hub`` (``pip install 'llama-proc[hf]'``);
this module only picks the GGUF file of a repository and hands back its path. ``import llama_proc`` does
not import ``huggingface_hub``: it is loaded by the first call that needs it.

A model spec names a GGUF in a model repository::

    hf://org/repo                   the only GGUF of the repository
    hf://org/repo:Q4_K_M            the GGUF of that quantization
    hf://org/repo/path/model.gguf   that file
    hf://org/repo@v1.0:Q8_0         the same, at a branch, tag or commit

A split model (``name-00001-of-00003.gguf`` and its siblings) is one model: it is pulled whole, and
its first part is the path llama-server is given (it loads the others from the same folder).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, NamedTuple, Sequence

from .config import HubModel, _looks_like_spec
from .errors import AmbiguousModel, HubModelNotFound

__all__ = ["CachedModel", "HubModel", "cached_models", "gguf_info", "pull", "resolve"]

_SPLIT_RE = re.compile(r"^(?P<stem>.*)-(?P<part>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)
_QUANT_IN_NAME = re.compile(r"(?<![A-Za-z0-9])((?:I?Q\d+_[A-Z0-9_]*?|F16|BF16|F32|TQ\d_\d))(?=[.-]|$)", re.IGNORECASE)


def _hub() -> Any:
    try:
        import huggingface_hub
        import huggingface_hub.constants
        import huggingface_hub.utils
    except ImportError:
        raise ImportError(
            "models from the Hugging Face hub need the huggingface_hub package: pip install 'llama-proc[hf]'"
        ) from None
    return huggingface_hub


# -- choosing the file ----------------------------------------------------------------------------


def _parts(filename: str) -> list[str]:
    """Every file of the model whose (first) file is ``filename``: itself, or all parts of a split."""
    match = _SPLIT_RE.match(filename)
    if match is None:
        return [filename]
    count = int(match["count"])
    return [f"{match['stem']}-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1)]


def _candidates(names: Sequence[str]) -> list[str]:
    """The GGUF models among a repository's files, each by its (first) file; multimodal projectors
    (``mmproj``) are left out, as they are not models on their own."""
    found = []
    for name in names:
        base = name.rsplit("/", 1)[-1]
        if not base.lower().endswith(".gguf") or "mmproj" in base.lower():
            continue
        match = _SPLIT_RE.match(name)
        if match is None or int(match["part"]) == 1:
            found.append(name)
    return sorted(found)


def quant_of(filename: str) -> str | None:
    """The quantization a file's name states (``model-Q4_K_M.gguf`` -> ``Q4_K_M``), or None."""
    base = filename.rsplit("/", 1)[-1]
    split = _SPLIT_RE.match(base)
    stem = split["stem"] if split else base[: -len(".gguf")] if base.lower().endswith(".gguf") else base
    found = _QUANT_IN_NAME.findall(stem)
    return found[-1].upper() if found else None


class _NotInCache(HubModelNotFound):
    """What the spec names is not in the cache (and the hub was not, or could not be, asked)."""


def _matches_quant(name: str, quant: str) -> bool:
    """Whether the file ``name`` is of quantization ``quant``: the quantization its name states, or
    ``quant`` standing as a whole word in it (``UD-Q4_K_XL``; ``F16`` is not in ``BF16``, nor
    ``Q4_0`` in ``Q4_0_4_4``)."""
    if quant_of(name) == quant.upper():
        return True
    base = name.rsplit("/", 1)[-1]
    return re.search(rf"(?<![A-Za-z0-9]){re.escape(quant)}(?![A-Za-z0-9_])", base, re.IGNORECASE) is not None


def _choose(model: HubModel, names: Sequence[str], where: str, from_cache: bool = False) -> str:
    """The (first) file of ``model`` among a repository's files (``from_cache``: the files in the
    cache, so a file missing there may still be on the hub).

    :raises HubModelNotFound: when none matches. :raises AmbiguousModel: when several do.
    """
    candidates = _candidates(names)
    matching = candidates if model.quant is None else [n for n in candidates if _matches_quant(n, model.quant)]
    if len(matching) == 1:
        return matching[0]
    if matching:
        example = str(HubModel(model.repo_id, matching[0], revision=model.revision))
        stated = [quant_of(n) for n in matching]
        if model.quant is None and None not in stated and len(set(stated)) == len(stated):
            example += f" or {HubModel(model.repo_id, quant=stated[0], revision=model.revision)}"
        raise AmbiguousModel(str(model), matching, example)
    error = _NotInCache if from_cache else HubModelNotFound
    if not candidates:
        raise error(str(model), f"{where} holds no GGUF file", _hint(model) if from_cache else "")
    quants = sorted({q for q in map(quant_of, candidates) if q})
    hint = f"pick one of {', '.join(quants) if quants else ', '.join(candidates)}"
    if from_cache:
        hint += f", or {_hint(model)}"
    raise error(str(model), f"{where} has no GGUF file of quantization {model.quant}", hint)


# -- the hub and its cache -----------------------------------------------------------------------


def _cached_files(hub: Any, model: HubModel, cache_dir: str | Path | None) -> list[tuple[str, Path]] | None:
    """The files of ``model``'s revision in the cache, as (name in repo, snapshot path); None when
    the cache has no snapshot of that revision."""
    try:
        info = hub.scan_cache_dir(cache_dir)
    except hub.CacheNotFound:
        return None
    wanted = model.revision or "main"
    for repo in info.repos:
        if repo.repo_type != "model" or repo.repo_id != model.repo_id:
            continue
        for revision in repo.revisions:
            if wanted in revision.refs or revision.commit_hash.startswith(wanted):
                snapshot = Path(revision.snapshot_path)
                return sorted((f.file_path.relative_to(snapshot).as_posix(), Path(f.file_path)) for f in revision.files)
    return None


def _is_bug(exc: BaseException) -> bool:
    return isinstance(exc, (TypeError, AttributeError, NameError, AssertionError))


def _hint(model: HubModel, filename: str | None = None) -> str:
    spec = HubModel(model.repo_id, filename or model.filename, None if filename else model.quant, model.revision)
    if _hub().constants.HF_HUB_OFFLINE:
        return f"run `llama-proc pull {spec}` with HF_HUB_OFFLINE unset, where the hub can be reached"
    return f"run `llama-proc pull {spec}` where the hub can be reached"


def _listing(
    hub: Any, model: HubModel, token: str | bool | None, cache_dir: Any, offline: str
) -> tuple[list[str], str, bool]:
    """The repository's file names, where they come from, and whether that is the cache: the hub,
    else (``offline`` names why, or the hub is unreachable) the cache.

    :raises HubModelNotFound: for a repository or revision the hub does not have, or neither
        the hub nor the cache can tell.
    """
    reason = offline
    if not offline:
        try:
            info = hub.HfApi(token=token).model_info(model.repo_id, revision=model.revision, timeout=30)
            return [s.rfilename for s in (info.siblings or [])], model.repo_id, False
        except Exception as exc:  # unless the hub refused: it is down or unreachable, the cache may help
            refused = _refusal(hub, model, exc)
            if refused is not None:
                raise refused from None
            if _is_bug(exc):
                raise
            text = str(exc).splitlines()[0] if str(exc) else ""
            text = text if len(text) <= 100 else text[:97] + "..."
            reason = f"the hub cannot be reached ({type(exc).__name__}: {text})"
    cached = _cached_files(hub, model, cache_dir)
    if cached is None:
        raise _NotInCache(str(model), f"{reason}, and the cache has no copy of it", _hint(model))
    return [name for name, _ in cached], f"the cached copy of {model.repo_id} ({reason})", True


def _download(hub: Any, model: HubModel, filename: str, token: Any, cache_dir: Any, offline: str) -> Path:
    try:
        return Path(
            hub.hf_hub_download(
                model.repo_id,
                filename,
                revision=model.revision,
                token=token,
                cache_dir=cache_dir,
                local_files_only=bool(offline),
            )
        )
    except hub.utils.LocalEntryNotFoundError:
        reason = offline or "the hub cannot be reached"
        raise _NotInCache(
            str(model), f"{reason}, and the cache has no copy of {filename}", _hint(model, filename)
        ) from None
    except hub.utils.EntryNotFoundError:
        raise HubModelNotFound(str(model), f"{model.repo_id} has no file {filename}") from None
    except hub.utils.HfHubHTTPError as exc:
        refused = _refusal(hub, model, exc)
        if refused is None:
            raise
        raise refused from None


def _refusal(hub: Any, model: HubModel, exc: BaseException) -> HubModelNotFound | None:
    """The hub's refusal of the repository or revision (gated, absent or private, no such revision)
    as the error that says what to do; None for any other exception."""
    if isinstance(exc, hub.utils.GatedRepoError):  # before its base class, RepositoryNotFoundError
        return HubModelNotFound(str(model), f"{model.repo_id} is gated", "accept its terms on the hub and set HF_TOKEN")
    if isinstance(exc, hub.utils.RepositoryNotFoundError):
        return HubModelNotFound(
            str(model),
            f"no model repository {model.repo_id} on {hub.constants.ENDPOINT}",
            "check the name; a private repository needs a token (HF_TOKEN, or a saved hub login)",
        )
    if isinstance(exc, hub.utils.RevisionNotFoundError):
        return HubModelNotFound(str(model), f"{model.repo_id} has no revision {model.revision}")
    return None


def _as_model(repo_id: str | HubModel, filename: str | None, quant: str | None, revision: str | None) -> HubModel:
    if isinstance(repo_id, HubModel):
        model = repo_id
    else:  # "org/repo", or a spec with or without its hf:// ("org/repo:Q4_K_M", as llama.cpp's -hf takes)
        model = HubModel.parse(repo_id if _looks_like_spec(repo_id) else "hf://" + repo_id)
    return HubModel(model.repo_id, filename or model.filename, quant or model.quant, revision or model.revision)


def pull(
    repo_id: str | HubModel,
    filename: str | None = None,
    *,
    quant: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
) -> Path:
    """Download a GGUF model into the Hugging Face cache (if it is not there yet) and return its path.

    The file is ``filename`` if given, else the one of quantization ``quant`` (``"Q4_K_M"``), else the
    repository's only GGUF model. A split model is downloaded whole; its first part is returned.
    Offline (``HF_HUB_OFFLINE=1``, ``local_files_only=True``, or the hub unreachable) the model comes
    from the cache.

    :param repo_id: ``"org/repo"``, or a whole spec (``"hf://org/repo:Q4_K_M"``).
    :param token: a hub token; by default ``HF_TOKEN`` or the one saved by ``hf auth login``.
    :param cache_dir: the hub cache to use instead of ``$HF_HOME/hub``.
    :raises HubModelNotFound: naming what is missing (repository, revision, file, quantization, or the
        cached copy when offline) and what to do.
    :raises AmbiguousModel: when several GGUF models match, listing them.
    :raises ValueError: for a malformed repository name or spec.
    :raises ImportError: without ``huggingface_hub`` (``pip install 'llama-proc[hf]'``).
    """
    try:
        return _pull(_as_model(repo_id, filename, quant, revision), token, cache_dir, local_files_only)
    except _NotInCache as exc:  # to the caller, one more HubModelNotFound
        raise HubModelNotFound(exc.path, exc.reason, exc.hint) from None


def _pull(model: HubModel, token: str | bool | None, cache_dir: str | Path | None, local_files_only: bool) -> Path:
    hub = _hub()
    offline = (
        "looked up in the cache only"
        if local_files_only
        else "offline (HF_HUB_OFFLINE is set)"
        if hub.constants.HF_HUB_OFFLINE
        else ""
    )
    first = model.filename
    if first is None:
        names, where, from_cache = _listing(hub, model, token, cache_dir, offline)
        first = _choose(model, names, where + (f" at {model.revision}" if model.revision else ""), from_cache)
        if from_cache:  # the hub was not asked, or could not be reached: no second try per file
            offline = offline or "the hub cannot be reached"
    paths = [_download(hub, model, name, token, cache_dir, offline) for name in _parts(first)]
    return paths[0]


def resolve(model: HubModel, *, cache_dir: str | Path | None = None, local_files_only: bool = False) -> Path:
    """The local path of ``model``, as a server start needs it.

    A spec that names its file, or a quantization found in the cache, is taken from the cache when
    it is there: it starts without the network, and ``pull()`` is the way to look for a newer
    revision. A spec that names only the repository asks the hub which GGUF models it holds (so a
    second one is an :class:`~llama_proc.errors.AmbiguousModel` whatever the cache holds), and
    falls back to the cache when the hub cannot be reached. What is not cached is downloaded.

    :param local_files_only: never ask the hub (a restart uses this).
    """
    if model.filename is not None or model.quant is not None:
        try:
            return _pull(model, None, cache_dir, True)
        except _NotInCache as exc:
            if local_files_only:
                raise HubModelNotFound(exc.path, exc.reason, exc.hint) from None
    return pull(model, cache_dir=cache_dir, local_files_only=local_files_only)


# -- what is in the cache --------------------------------------------------------------------------


class GGUFInfo(NamedTuple):
    """What a GGUF file's header says: the architecture and the quantization (file type)."""

    architecture: str | None
    quant: str | None


def gguf_info(path: str | Path) -> GGUFInfo:
    """Read the architecture and quantization from a GGUF file's header, without loading its tensors.

    Needs the ``gguf`` package (``llama-proc[hf]``); the quantization falls back to the one the file
    name states when the header has none.

    :raises NotAGGUFFile: when the file is not GGUF.
    """
    import gguf

    from .errors import NotAGGUFFile

    try:
        reader = gguf.GGUFReader(str(path))
    except ValueError:
        raise NotAGGUFFile(str(path)) from None

    def value(key: str) -> Any:
        field = reader.fields.get(key)
        return None if field is None else field.contents()

    arch = value("general.architecture")
    file_type = value("general.file_type")
    quant = None
    if isinstance(file_type, int):
        try:
            quant = gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_")
        except ValueError:
            quant = None
        if quant == "ALL_F32":
            quant = "F32"
    return GGUFInfo(arch if isinstance(arch, str) else None, quant or quant_of(Path(path).name))


class CachedModel(NamedTuple):
    """A GGUF model in the Hugging Face cache (``llama-proc models``)."""

    repo_id: str
    filename: str
    revision: str  #: ``main``, else another branch or tag that points at it, else the commit
    path: Path
    size: int
    parts: int
    architecture: str | None
    quant: str | None

    @property
    def spec(self) -> str:
        """The ``hf://`` spec that names it (with its revision when that is not ``main``)."""
        return str(HubModel(self.repo_id, self.filename, revision=None if self.revision == "main" else self.revision))


def cached_models(cache_dir: str | Path | None = None) -> list[CachedModel]:
    """The GGUF models in the Hugging Face cache, with size (all parts), architecture and quantization
    read from each file's header. A revision is named by its branch or tag when it has one."""
    hub = _hub()
    try:
        info = hub.scan_cache_dir(cache_dir)
    except hub.CacheNotFound:
        return []
    out = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        for revision in sorted(repo.revisions, key=lambda r: r.last_modified, reverse=True):
            snapshot = Path(revision.snapshot_path)
            files = {f.file_path.relative_to(snapshot).as_posix(): f for f in revision.files}
            for name in _candidates(list(files)):
                parts = [files[p] for p in _parts(name) if p in files]
                first = files[name].file_path
                try:
                    arch, quant = gguf_info(first)
                except Exception:  # a damaged or foreign file is listed, not fatal to the listing
                    arch, quant = None, quant_of(name)
                refs = sorted(revision.refs)
                named = [r for r in refs if "/" not in r]  # refs/pr/1 cannot stand in a spec: the commit can
                out.append(
                    CachedModel(
                        repo.repo_id,
                        name,
                        "main" if "main" in refs else named[0] if named else revision.commit_hash,
                        Path(first),
                        sum(p.size_on_disk for p in parts),
                        len(parts),
                        arch,
                        quant,
                    )
                )
    return out
