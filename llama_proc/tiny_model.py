"""A tiny llama-architecture GGUF model for demos and tests.

The model has random weights (its text is noise) but a real vocabulary, taken
from ``models/ggml-vocab-llama-spm.gguf`` of a llama.cpp source tree, and a
chat template, so ``llama-server`` serves chat, completion, tokenize and
embedding requests with it exactly as it would with a real model. It loads in
a fraction of a second.

Writing it needs the optional ``gguf`` package (``pip install llama-proc[model]``).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from . import binaries
from ._paths import private_cache_dir
from .errors import ConfigError, IoError

__all__ = ["TINY_CHAT_TEMPLATE", "VOCAB_MEMBER", "ensure_tiny_model", "write_tiny_model"]

_log = logging.getLogger("llama_proc.tiny_model")

#: Where the vocabulary lives inside a llama.cpp source tree.
VOCAB_MEMBER = "models/ggml-vocab-llama-spm.gguf"

#: A minimal Jinja chat template understood by llama-server's ``--jinja`` engine
#: and by its built-in template detection.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

_N_EMBD = 64
_N_LAYER = 2
_N_HEAD = 4
_N_FF = 128
_N_CTX = 2048
_FORMAT_VERSION = 1


def _require_gguf() -> Any:
    try:
        import gguf
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ConfigError(
            [
                "gguf: the 'gguf' package is needed to write the tiny model; "
                "install it with: pip install 'llama-proc[model]'"
            ]
        ) from exc
    return gguf


def write_tiny_model(
    path: str | os.PathLike[str], vocab: str | os.PathLike[str], *, seed: int = 0, shards: int = 1
) -> Path:
    """Write the tiny model to ``path``, atomically.

    :param path: the ``.gguf`` file to write.
    :param vocab: a vocabulary-only GGUF (``models/ggml-vocab-llama-spm.gguf``).
    :param seed: seed of the random weights; the same seed gives the same file.
    :param shards: split the model into this many files, named as llama.cpp names the parts of a
        split model (``tiny-00001-of-00002.gguf`` for ``tiny.gguf``) and written beside ``path``.
    :returns: ``path`` as a :class:`~pathlib.Path`, or the first part of a split model.
    """
    gguf = _require_gguf()
    import numpy as np

    target = Path(path)
    reader = gguf.GGUFReader(os.fspath(vocab))

    def field(name: str) -> Any:
        f = reader.fields.get(name)
        if f is None:
            raise ConfigError([f"vocab: {vocab} has no field {name!r}; is it a llama.cpp vocab file?"])
        return f.contents()

    tokens = [t.encode("utf-8") if isinstance(t, str) else bytes(t) for t in field("tokenizer.ggml.tokens")]
    scores = [float(s) for s in field("tokenizer.ggml.scores")]
    token_types = [int(t) for t in field("tokenizer.ggml.token_type")]
    n_vocab = len(tokens)

    rng = np.random.default_rng(seed)

    def weights(*shape: int) -> Any:
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    def fill(writer: Any) -> None:  # the model's metadata and weights, written out
        writer.add_name("llama-proc tiny")
        writer.add_block_count(_N_LAYER)
        writer.add_context_length(_N_CTX)
        writer.add_embedding_length(_N_EMBD)
        writer.add_feed_forward_length(_N_FF)
        writer.add_head_count(_N_HEAD)
        writer.add_head_count_kv(_N_HEAD)
        writer.add_rope_dimension_count(_N_EMBD // _N_HEAD)
        writer.add_layer_norm_rms_eps(1e-5)
        writer.add_vocab_size(n_vocab)
        writer.add_file_type(0)  # all F32
        writer.add_tokenizer_model(str(field("tokenizer.ggml.model")))
        writer.add_tokenizer_pre(str(field("tokenizer.ggml.pre")))
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(token_types)
        writer.add_bos_token_id(int(field("tokenizer.ggml.bos_token_id")))
        writer.add_eos_token_id(int(field("tokenizer.ggml.eos_token_id")))
        writer.add_unk_token_id(int(field("tokenizer.ggml.unknown_token_id")))
        writer.add_add_bos_token(True)
        writer.add_add_eos_token(False)
        writer.add_chat_template(TINY_CHAT_TEMPLATE)

        writer.add_tensor("token_embd.weight", weights(n_vocab, _N_EMBD))
        for i in range(_N_LAYER):
            writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(_N_EMBD, dtype=np.float32))
            for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
                writer.add_tensor(f"blk.{i}.{name}.weight", weights(_N_EMBD, _N_EMBD))
            writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(_N_EMBD, dtype=np.float32))
            writer.add_tensor(f"blk.{i}.ffn_gate.weight", weights(_N_FF, _N_EMBD))
            writer.add_tensor(f"blk.{i}.ffn_up.weight", weights(_N_FF, _N_EMBD))
            writer.add_tensor(f"blk.{i}.ffn_down.weight", weights(_N_EMBD, _N_FF))
        writer.add_tensor("output_norm.weight", np.ones(_N_EMBD, dtype=np.float32))
        writer.add_tensor("output.weight", weights(n_vocab, _N_EMBD))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    target.parent.mkdir(parents=True, exist_ok=True)
    if shards > 1:
        n_tensors = 3 + 9 * _N_LAYER
        with tempfile.TemporaryDirectory(prefix=target.name + ".", dir=target.parent) as tmp:
            writer = gguf.GGUFWriter(os.path.join(tmp, target.name), "llama", split_max_tensors=-(-n_tensors // shards))
            fill(writer)
            parts = sorted(Path(tmp).iterdir())
            for part in parts:
                os.replace(part, target.parent / part.name)
        return target.parent / parts[0].name
    fd, tmp_name = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp_name, "llama")
        fill(writer)
        os.replace(tmp_name, target)
    except BaseException:
        with _suppress_oserror():
            os.unlink(tmp_name)
        raise
    return target


class _suppress_oserror:
    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: object, exc: object, tb: object) -> bool:
        return isinstance(exc, OSError)


def _extract_vocab(source: Path, dest: Path) -> Path:
    """Copy the vocabulary out of a source tree or a source archive into ``dest``."""
    import tarfile

    if source.is_dir():
        root = binaries.find_source_root(source)
        return root / VOCAB_MEMBER
    try:
        with tarfile.open(source) as tar:
            for member in tar.getmembers():
                if member.isfile() and member.name.endswith("/" + VOCAB_MEMBER):
                    extracted = tar.extractfile(member)
                    if extracted is None:  # pragma: no cover - isfile() was checked
                        break
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    tmp = dest.with_suffix(".part")
                    with extracted, open(tmp, "wb") as out:
                        out.write(extracted.read())
                    os.replace(tmp, dest)
                    return dest
    except (OSError, tarfile.TarError) as exc:
        raise IoError(f"cannot read {source}: {exc}") from exc
    raise ConfigError([f"source: {source} holds no {VOCAB_MEMBER}"])


def ensure_tiny_model(source: str | os.PathLike[str] | None = None, *, seed: int = 0) -> Path:
    """Return the cached tiny model, writing it first if needed.

    :param source: a llama.cpp source tree or source archive to take the vocabulary from;
        by default the pinned source distribution (see :func:`llama_proc.binaries.fetch_source`).
    :param seed: seed of the random weights.
    :returns: the path of the ``.gguf`` file in the user cache directory.
    """
    cache = private_cache_dir() / "models"
    target = cache / f"tiny-llama-v{_FORMAT_VERSION}-s{seed}.gguf"
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    import filelock

    with filelock.FileLock(str(cache / ".tiny-model.lock"), timeout=300):
        if target.is_file():
            return target
        src = Path(source) if source is not None else binaries.fetch_source()
        vocab = _extract_vocab(src, cache / "ggml-vocab-llama-spm.gguf")
        _log.info("writing tiny model %s", target)
        return write_tiny_model(target, vocab, seed=seed)
