from __future__ import annotations

from pathlib import Path

import attrs
import pytest

from llama_proc import ConfigError, FlagDialect, LlamaServerArgs

OLD = FlagDialect(load_mode=False, flash_attn_value=False, no_webui="--no-webui", webui=None)


def test_minimal_argv_is_model_and_host_only() -> None:
    assert LlamaServerArgs(model="m.gguf").to_args() == ["--model", "m.gguf", "--host", "127.0.0.1"]


def test_argv_order_alias_model_embeddings_key_host_port() -> None:
    args = LlamaServerArgs(model="/m/x.gguf", alias="x", embeddings=True, api_key="k", port=8081)
    assert args.to_args() == [
        "--alias", "x", "--model", "/m/x.gguf", "--embeddings", "--api-key", "k",
        "--host", "127.0.0.1", "--port", "8081",
    ]  # fmt: skip


def test_every_field_golden() -> None:
    args = LlamaServerArgs(
        model="m.gguf", n_ctx=4096, n_predict=128, n_parallel=4, n_gpu_layers=-1, threads=4, threads_batch=8,
        batch_size=2048, ubatch_size=512, flash_attn=True, cont_batching=False, mlock=True, mmap=False,
        cache_type_k="q8_0", cache_type_v="q8_0", seed=42, jinja=True, chat_template="chatml", pooling="mean",
        reranking=True, metrics=True, slots=False, webui=False, verbose=True, rpc=["h1:50052", "[::1]:50053"],
        extra_args=["--system-prompt", "a value with spaces", "--log-prefix", "--log-prefix"],
    )  # fmt: skip
    assert args.to_args() == [
        "--model", "m.gguf", "--host", "127.0.0.1",
        "--ctx-size", "4096", "--n-predict", "128", "--parallel", "4", "--n-gpu-layers", "-1",
        "--threads", "4", "--threads-batch", "8", "--batch-size", "2048", "--ubatch-size", "512",
        "--flash-attn", "on", "--no-cont-batching", "--load-mode", "mlock", "--cache-type-k", "q8_0", "--cache-type-v", "q8_0",
        "--seed", "42", "--jinja", "--chat-template", "chatml", "--pooling", "mean", "--reranking", "--metrics",
        "--no-slots", "--no-webui", "--verbose", "--rpc", "h1:50052,[::1]:50053",
        "--system-prompt", "a value with spaces", "--log-prefix", "--log-prefix",
    ]  # fmt: skip
    # mlock/mmap are one --load-mode in new builds; older builds get the old switches
    old = args.to_args(OLD)
    assert "--load-mode" not in old
    assert old[old.index("--flash-attn") : old.index("--cache-type-k")] == [
        "--flash-attn", "--no-cont-batching", "--mlock", "--no-mmap",
    ]  # fmt: skip


def test_load_mode_dialect() -> None:
    assert LlamaServerArgs(model="m", mmap=False).to_args()[-2:] == ["--load-mode", "none"]
    assert LlamaServerArgs(model="m", mlock=True).to_args()[-2:] == ["--load-mode", "mmap+mlock"]
    assert LlamaServerArgs(model="m", mlock=True, mmap=False).to_args()[-2:] == ["--load-mode", "mlock"]
    assert LlamaServerArgs(model="m", mmap=True).to_args()[-2:] == ["--load-mode", "mmap"]
    assert LlamaServerArgs(model="m", mmap=False).to_args(OLD)[-1] == "--no-mmap"


def test_flash_attn_forms() -> None:
    assert LlamaServerArgs(model="m", flash_attn="auto").to_args()[-2:] == ["--flash-attn", "auto"]
    assert LlamaServerArgs(model="m", flash_attn=False).to_args()[-2:] == ["--flash-attn", "off"]
    assert LlamaServerArgs(model="m", flash_attn=True).to_args(OLD)[-1] == "--flash-attn"
    assert "--flash-attn" not in LlamaServerArgs(model="m", flash_attn="off").to_args(OLD)


def test_unset_fields_add_nothing_and_tristates_are_explicit() -> None:
    assert "--jinja" not in LlamaServerArgs(model="m").to_args()
    assert LlamaServerArgs(model="m", jinja=False).to_args()[-1] == "--no-jinja"
    assert LlamaServerArgs(model="m", webui=True).to_args()[-1] == "--webui"
    assert LlamaServerArgs(model="m", webui=True).to_args(OLD)[-1] == "127.0.0.1"


def test_frozen_and_evolve() -> None:
    args = LlamaServerArgs(model="m")
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        args.port = 1  # type: ignore[misc]
    assert args.evolve(port=9000).port == 9000
    assert isinstance(args.model, Path)


def test_validation_names_every_bad_field() -> None:
    with pytest.raises(ConfigError) as info:
        LlamaServerArgs(
            model="m", port=70000, n_ctx=-1, n_parallel=0, cache_type_k="q9", pooling="max", flash_attn="maybe",
            rpc=["nohost"], jinja="yes", batch_size=8, ubatch_size=16, extra_args="--a b",  # type: ignore[arg-type]
        )  # fmt: skip
    problems = info.value.problems
    for name in (
        "port",
        "n_ctx",
        "n_parallel",
        "cache_type_k",
        "pooling",
        "flash_attn",
        "rpc",
        "jinja",
        "ubatch_size",
        "extra_args",
    ):
        assert any(p.startswith(name) for p in problems), (name, problems)
    assert "port: must be between 1 and 65535, got 70000" in str(info.value)
    assert info.value.code == "server_error-config_error"


def test_template_and_file_are_exclusive() -> None:
    with pytest.raises(ConfigError, match="give one of them"):
        LlamaServerArgs(model="m", chat_template="x", chat_template_file="t.jinja")


def test_api_key_hidden_in_repr_and_to_dict() -> None:
    args = LlamaServerArgs(model="m", api_key="s3cret")
    assert "s3cret" not in repr(args)
    assert args.to_dict()["api_key"] == "***"
    assert args.to_dict(include_secrets=True)["api_key"] == "s3cret"


def test_dict_round_trip() -> None:
    args = LlamaServerArgs(model="m.gguf", alias="a", n_ctx=512, rpc=["h:1"], extra_args=["--x", "y z"], jinja=False)
    data = args.to_dict(include_secrets=True)
    assert data == {
        "model": "m.gguf",
        "alias": "a",
        "n_ctx": 512,
        "jinja": False,
        "rpc": ["h:1"],
        "extra_args": ["--x", "y z"],
    }
    assert LlamaServerArgs.from_dict(data) == args


def test_from_dict_unknown_and_bad_keys_all_reported() -> None:
    with pytest.raises(ConfigError) as info:
        LlamaServerArgs.from_dict({"model": "m", "n_cxt": 5, "colour": "red"})
    assert [p.split(":")[0] for p in info.value.problems] == ["n_cxt", "colour"]
    with pytest.raises(ConfigError) as info:
        LlamaServerArgs.from_dict({"model": "m", "n_ctx": "lots", "embeddings": "perhaps"})
    text = str(info.value)
    assert "n_ctx" in text and "embeddings" in text
    with pytest.raises(ConfigError, match="model: required"):
        LlamaServerArgs.from_dict({"alias": "a"})


def test_from_dict_reports_what_the_validators_refuse() -> None:
    with pytest.raises(ConfigError) as info:
        LlamaServerArgs.from_dict({"model": "m", "port": 0, "pooling": "max"})
    assert info.value.problems == [
        "port: must be between 1 and 65535, got 0",
        "pooling: 'max' is not one of none, mean, cls, last, rank",
    ]
    with pytest.raises(ConfigError, match="APP_PORT: must be between 1 and 65535"):
        LlamaServerArgs.from_env("APP_", {"APP_MODEL": "m", "APP_PORT": "0"})


def test_from_env() -> None:
    env = {
        "APP_MODEL": "/models/m.gguf", "APP_N_CTX": "2048", "APP_EMBEDDINGS": "yes", "APP_JINJA": "off",
        "APP_RPC": "h1:1, h2:2", "APP_EXTRA_ARGS": "--system-prompt 'hello there'", "OTHER": "x",
    }  # fmt: skip
    args = LlamaServerArgs.from_env("APP_", env)
    assert args.n_ctx == 2048 and args.embeddings is True and args.jinja is False
    assert args.rpc == ("h1:1", "h2:2")
    assert args.extra_args == ("--system-prompt", "hello there")
    with pytest.raises(ConfigError, match="APP_N_CTX"):
        LlamaServerArgs.from_env("APP_", {"APP_MODEL": "m", "APP_N_CTX": "big"})
    with pytest.raises(ConfigError, match="APP_MODEL: required"):
        LlamaServerArgs.from_env("APP_", {})


def test_every_field_carries_its_validator() -> None:
    assert [f.name for f in attrs.fields(LlamaServerArgs) if f.validator is None] == []


def test_evolve_validates_and_lists_every_problem() -> None:
    args = LlamaServerArgs(model="m", batch_size=64)
    for evolve in (args.evolve, lambda **changes: attrs.evolve(args, **changes)):
        with pytest.raises(ConfigError) as info:
            evolve(port=0, ubatch_size=128, pooling="max")
        assert info.value.problems == [
            "port: must be between 1 and 65535, got 0",
            "ubatch_size: must not exceed batch_size (128 > 64)",
            "pooling: 'max' is not one of none, mean, cls, last, rank",
        ]
    assert args.evolve(port=8080).port == 8080


def test_problems_of_a_valid_instance_and_nothing_left_behind() -> None:
    from llama_proc import config

    assert LlamaServerArgs(model="m", port=1).problems() == []
    with pytest.raises(ConfigError, match="give one of them"):
        LlamaServerArgs(model="m", chat_template="x", chat_template_file="t.jinja")
    with pytest.raises(ConfigError):
        LlamaServerArgs(model="", api_key="a b", seed=2**32)
    assert config._found == {}  # what the validators found went with the error


def test_problems_of_concurrent_constructions_stay_apart() -> None:
    from concurrent.futures import ThreadPoolExecutor

    def build(port: int) -> list[str]:
        try:
            LlamaServerArgs(model="m", port=port, n_ctx=-port)
        except ConfigError as exc:
            return exc.problems
        return []

    with ThreadPoolExecutor(8) as pool:
        for port, problems in zip(range(70_000, 72_000), pool.map(build, range(70_000, 72_000))):
            assert problems == [
                f"port: must be between 1 and 65535, got {port}",
                f"n_ctx: must be >= 0, got {-port}",
            ]


def test_text_settings_of_an_ini_section() -> None:
    from llama_proc._convert import args_from_strings

    args = args_from_strings({"model": "m.gguf", "n_ctx": "512", "jinja": "yes", "rpc": "h:1,h:2"}, "chat.")
    assert (args.n_ctx, args.jinja, args.rpc) == (512, True, ("h:1", "h:2"))
    with pytest.raises(ConfigError) as info:
        args_from_strings({"model": "m.gguf", "n_ctx": "big", "extra_args": "'unclosed"}, "chat.")
    assert info.value.problems == ["chat.extra_args: cannot be split like a command line (No closing quotation)"]
    with pytest.raises(ConfigError) as info:
        args_from_strings({"model": "m.gguf", "n_ctx": "big"}, "chat.")
    assert [p.split(":")[0] for p in info.value.problems] == ["chat.n_ctx"]
    with pytest.raises(ConfigError) as info:
        args_from_strings({"model": "m.gguf", "port": "0", "pooling": "max"}, "chat.")
    assert [p.split(":")[0] for p in info.value.problems] == ["chat.port", "chat.pooling"]


def test_config_imports_only_errors_of_llama_proc() -> None:
    import ast

    from llama_proc import config

    tree = ast.parse(Path(config.__file__).read_text(encoding="utf-8"))
    own = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level}
    assert own == {"errors"}
