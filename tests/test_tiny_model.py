from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

gguf = pytest.importorskip("gguf")

from llama_proc.tiny_model import TINY_CHAT_TEMPLATE, ensure_tiny_model, write_tiny_model  # noqa: E402


def test_cached_model_is_reused(tiny_model: Path) -> None:
    assert ensure_tiny_model() == tiny_model
    reader = gguf.GGUFReader(str(tiny_model))
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["llama.block_count"].contents() == 2
    assert reader.fields["llama.embedding_length"].contents() == 64
    assert reader.fields["tokenizer.chat_template"].contents() == TINY_CHAT_TEMPLATE
    assert len(reader.fields["tokenizer.ggml.tokens"].contents()) == 32000
    assert 10_000_000 < tiny_model.stat().st_size < 30_000_000


def test_same_seed_same_bytes(tiny_model: Path, tmp_path: Path) -> None:
    vocab = tiny_model.parent / "ggml-vocab-llama-spm.gguf"
    a = write_tiny_model(tmp_path / "a.gguf", vocab, seed=5)
    b = write_tiny_model(tmp_path / "b.gguf", vocab, seed=5)
    assert a.read_bytes() == b.read_bytes()
    assert not list(tmp_path.glob("*.tmp"))
