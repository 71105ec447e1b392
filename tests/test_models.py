"""Models from the Hugging Face hub: specs, the choice of file, and pulls and server starts against a
loopback stand-in for the hub (``HF_ENDPOINT``), online and offline.

``huggingface_hub`` reads ``HF_ENDPOINT``/``HF_HOME``/``HF_HUB_OFFLINE`` when it is imported, so the
pulls and starts run in child processes with those variables set, as a user's would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from llama_proc import AmbiguousModel, ConfigError, HubModelNotFound, LlamaServerArgs, ModelNotFound
from llama_proc.models import HubModel, _choose, quant_of
from llama_proc.tiny_model import write_tiny_model

from .fake_hub import FakeHub

# -- specs ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "fields", "name"),
    [
        ("hf://org/repo", ("org/repo", None, None, None), "repo"),
        ("hf://org/repo:Q4_K_M", ("org/repo", None, "Q4_K_M", None), "repo:Q4_K_M"),
        ("hf://org/repo/sub/model-Q8_0.gguf", ("org/repo", "sub/model-Q8_0.gguf", None, None), "model-Q8_0.gguf"),
        ("hf://org/repo@v1.0:Q8_0", ("org/repo", None, "Q8_0", "v1.0"), "repo:Q8_0"),
        ("hf://org/repo@abc123/m.gguf", ("org/repo", "m.gguf", None, "abc123"), "m.gguf"),
    ],
)
def test_spec_forms(spec: str, fields: tuple[Any, ...], name: str) -> None:
    model = HubModel.parse(spec)
    assert (model.repo_id, model.filename, model.quant, model.revision) == fields
    assert str(model) == spec and model.name == name and model.ref == spec[len("hf://") :]


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("hf://repo", "expected hf://org/repo"),
        ("hf://org/repo/model.bin", "expected a .gguf file"),
        ("hf://org/repo:", "expected hf://org/repo"),
        ("hf://-org/repo", "expected a repository as org/name"),
        ("HF://org/repo", "expected hf://org/repo"),  # misspelt specs are reported, not taken as paths
        ("hf:/org/repo", "expected hf://org/repo"),
        ("hf://org/repo@v1@v2", "expected hf://org/repo"),
    ],
)
def test_bad_specs_are_config_errors(spec: str, says: str) -> None:
    with pytest.raises(ConfigError, match="model: " + says):
        LlamaServerArgs(model=spec)
    with pytest.raises(ConfigError, match="model: " + says):
        LlamaServerArgs.from_dict({"model": spec})


def test_args_take_a_hub_spec_in_every_form() -> None:
    args = LlamaServerArgs(model="hf://org/repo:Q4_K_M", n_ctx=256)
    assert args.model == HubModel("org/repo", quant="Q4_K_M")
    assert args.to_dict() == {"model": "hf://org/repo:Q4_K_M", "n_ctx": 256}
    assert LlamaServerArgs.from_dict(args.to_dict()) == args
    assert LlamaServerArgs.from_env(environ={"LLAMA_PROC_MODEL": "hf://org/repo/m.gguf"}).model == HubModel(
        "org/repo", "m.gguf"
    )
    assert LlamaServerArgs(model=HubModel("org/repo")).model == HubModel("org/repo")
    assert LlamaServerArgs(model="models/m.gguf").model == Path("models/m.gguf")


# -- choosing the file --------------------------------------------------------------------------------

_REPO = [
    "README.md",
    "model-Q4_K_M.gguf",
    "model-Q8_0.gguf",
    "mmproj-model-F16.gguf",
    "big/model-F16-00001-of-00002.gguf",
    "big/model-F16-00002-of-00002.gguf",
]


def test_choose_by_quant_and_parts() -> None:
    assert _choose(HubModel("o/r", quant="q8_0"), _REPO, "o/r") == "model-Q8_0.gguf"
    assert _choose(HubModel("o/r", quant="F16"), _REPO, "o/r") == "big/model-F16-00001-of-00002.gguf"
    assert _choose(HubModel("o/r"), ["a.txt", "only.gguf", "mmproj-x.gguf"], "o/r") == "only.gguf"


def test_several_candidates_are_listed() -> None:
    with pytest.raises(AmbiguousModel) as info:
        _choose(HubModel("o/r"), _REPO, "o/r")
    assert info.value.candidates == ["big/model-F16-00001-of-00002.gguf", "model-Q4_K_M.gguf", "model-Q8_0.gguf"]
    assert "model-Q4_K_M.gguf, model-Q8_0.gguf" in str(info.value) and isinstance(info.value, ModelNotFound)


def test_a_quant_matches_only_itself() -> None:
    with pytest.raises(HubModelNotFound, match="pick one of BF16, Q8_0"):
        _choose(HubModel("o/r", quant="F16"), ["m-BF16.gguf", "m-Q8_0.gguf"], "o/r")
    with pytest.raises(HubModelNotFound, match="pick one of Q4_0_4_4"):
        _choose(HubModel("o/r", quant="Q4_0"), ["m-Q4_0_4_4.gguf"], "o/r")
    # a quantization named with a prefix, as some publishers do (unsloth's "UD-" dynamic quants)
    ud = ["m-UD-Q4_K_XL.gguf", "m-UD-IQ1_S.gguf", "m-Q4_K_XL.gguf"]
    assert _choose(HubModel("o/r", quant="UD-Q4_K_XL"), ud, "o/r") == "m-UD-Q4_K_XL.gguf"
    with pytest.raises(HubModelNotFound):
        _choose(HubModel("o/r", quant="MXFP4"), ["m-MXFP4_MOE.gguf"], "o/r")
    # a quantization the name pattern does not know matches as a whole word only
    assert _choose(HubModel("o/r", quant="ternary"), ["m-ternary.gguf", "m-ternaryx.gguf"], "o/r") == "m-ternary.gguf"


def test_an_argv_needs_the_spec_resolved_first() -> None:
    with pytest.raises(ConfigError, match=r"model: hf://org/repo:Q8_0 is found or downloaded when the server starts"):
        LlamaServerArgs(model="hf://org/repo:Q8_0").to_args()


def test_a_missing_quant_lists_those_there_are() -> None:
    with pytest.raises(HubModelNotFound, match="no GGUF file of quantization Q2_K.*pick one of F16, Q4_K_M, Q8_0"):
        _choose(HubModel("o/r", quant="Q2_K"), _REPO, "o/r")
    with pytest.raises(HubModelNotFound, match="o/r holds no GGUF file"):
        _choose(HubModel("o/r"), ["README.md"], "o/r")


@pytest.mark.parametrize(
    ("name", "quant"),
    [("m-Q4_K_M.gguf", "Q4_K_M"), ("m.q8_0.gguf", "Q8_0"), ("m-IQ2_XXS-00001-of-00003.gguf", "IQ2_XXS"),
     ("m-bf16.gguf", "BF16"), ("model.gguf", None)],
)  # fmt: skip
def test_quant_of_file_names(name: str, quant: str | None) -> None:
    assert quant_of(name) == quant


def test_import_llama_proc_does_not_import_huggingface_hub() -> None:
    code = "import sys, llama_proc, llama_proc.models; print('huggingface_hub' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# -- against the hub stand-in -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hub_repos(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    """Three repositories: one GGUF, two quantizations (and a projector), and a model in 3 parts."""
    folder = tmp_path_factory.mktemp("hub-files")
    first = write_tiny_model(folder / "tiny.gguf", tiny_model.parent / "ggml-vocab-llama-spm.gguf", shards=3)
    parts = sorted(first.parent.glob("tiny-0000?-of-00003.gguf"))
    assert len(parts) == 3
    readme = folder / "README.md"
    readme.write_text("# tiny\n")
    return {
        "org/tiny": {"tiny-F32.gguf": tiny_model, "README.md": readme},
        "org/multi": {"m-Q8_0.gguf": tiny_model, "m-F32.gguf": tiny_model, "mmproj-m-F16.gguf": tiny_model},
        "org/split": {p.name: p for p in parts},
    }


@pytest.fixture
def hub(hub_repos: dict[str, dict[str, Path]]) -> Iterator[FakeHub]:
    fake = FakeHub(hub_repos).start()
    try:
        yield fake
    finally:
        fake.stop()


def _env(tmp_path: Path, hub: FakeHub, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(
        HF_HOME=str(tmp_path / "hf"),
        HF_ENDPOINT=hub.url,
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        PYTHONPATH=str(Path(__file__).resolve().parents[1]),
    )
    env.update(extra)
    return env


def _cli(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llama_proc", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def _snapshot_of(tmp_path: Path, repo: str) -> Path:
    (snapshot,) = (tmp_path / "hf" / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots").iterdir()
    return snapshot


def test_pull_downloads_into_the_hub_cache(tmp_path: Path, hub: FakeHub, tiny_model: Path) -> None:
    env = _env(tmp_path, hub)
    done = _cli(env, "pull", "org/tiny")
    assert done.returncode == 0, done.stderr
    path = Path(done.stdout.strip())
    assert path == _snapshot_of(tmp_path, "org/tiny") / "tiny-F32.gguf"
    assert path.read_bytes() == tiny_model.read_bytes()
    assert hub.downloads() == ["/org/tiny/resolve/main/tiny-F32.gguf"]  # the README is not fetched

    picked = _cli(env, "pull", "org/multi", "--quant", "q8_0")
    assert picked.returncode == 0, picked.stderr
    assert Path(picked.stdout.strip()).name == "m-Q8_0.gguf"
    as_llama_cpp_names_it = _cli(env, "pull", "org/multi:F32")  # the form of llama.cpp's -hf
    assert as_llama_cpp_names_it.returncode == 0, as_llama_cpp_names_it.stderr
    assert Path(as_llama_cpp_names_it.stdout.strip()).name == "m-F32.gguf"


def test_pull_of_a_split_model_downloads_every_part(tmp_path: Path, hub: FakeHub) -> None:
    done = _cli(_env(tmp_path, hub), "pull", "hf://org/split")
    assert done.returncode == 0, done.stderr
    snapshot = _snapshot_of(tmp_path, "org/split")
    assert Path(done.stdout.strip()) == snapshot / "tiny-00001-of-00003.gguf"
    assert sorted(p.name for p in snapshot.iterdir()) == [f"tiny-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    assert len(hub.downloads()) == 3


def test_pull_errors_say_what_is_missing(tmp_path: Path, hub: FakeHub) -> None:
    env = _env(tmp_path, hub)
    several = _cli(env, "pull", "org/multi")
    assert several.returncode == 2
    assert several.stderr.strip() == (
        "llama-proc: error [server_error-ambiguous_model]: Model hf://org/multi matches several GGUF files: "
        "m-F32.gguf, m-Q8_0.gguf. Name one, as hf://org/multi/m-F32.gguf or hf://org/multi:F32."
    )
    no_repo = _cli(env, "pull", "org/nope")
    assert no_repo.returncode == 2
    assert f"no model repository org/nope on {hub.url}" in no_repo.stderr and "HF_TOKEN" in no_repo.stderr
    no_file = _cli(env, "pull", "org/tiny", "--file", "other.gguf")
    assert no_file.returncode == 2 and "org/tiny has no file other.gguf" in no_file.stderr
    bad = _cli(env, "pull", "hf://org")
    assert bad.returncode == 2 and "expected hf://org/repo" in bad.stderr
    assert hub.downloads() == []  # nothing was downloaded by any of them
    assert len(no_repo.stderr.strip().splitlines()) == 1


def test_offline_pull_comes_from_the_cache(tmp_path: Path, hub: FakeHub) -> None:
    env = _env(tmp_path, hub)
    assert _cli(env, "pull", "org/multi", "--quant", "Q8_0").returncode == 0
    seen = len(hub.requests)
    offline = _cli({**env, "HF_HUB_OFFLINE": "1"}, "pull", "org/multi")  # the only cached GGUF of the repo
    assert offline.returncode == 0, offline.stderr
    assert Path(offline.stdout.strip()).name == "m-Q8_0.gguf"
    missing = _cli({**env, "HF_HUB_OFFLINE": "1"}, "pull", "org/tiny")
    assert missing.returncode == 2
    assert "HF_HUB_OFFLINE" in missing.stderr
    assert "run `llama-proc pull hf://org/tiny` with HF_HUB_OFFLINE unset" in missing.stderr
    assert len(hub.requests) == seen


_RESOLVE = """
import sys
from llama_proc import LlamaProcError
from llama_proc.models import HubModel, resolve
try:
    print(resolve(HubModel.parse(sys.argv[1])).name)
except LlamaProcError as exc:
    print(type(exc).__name__, exc)
"""


def _resolve(env: dict[str, str], spec: str) -> str:
    done = subprocess.run([sys.executable, "-c", _RESOLVE, spec], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_resolve_takes_from_the_cache_only_what_the_spec_names(tmp_path: Path, hub: FakeHub) -> None:
    env = _env(tmp_path, hub)
    assert _resolve(env, "hf://org/multi:Q8_0") == "m-Q8_0.gguf"  # downloaded
    seen = len(hub.requests)
    assert _resolve(env, "hf://org/multi:Q8_0") == "m-Q8_0.gguf"  # from the cache
    assert len(hub.requests) == seen
    # another quantization of a cached repository is downloaded, not refused
    assert _resolve(env, "hf://org/multi:F32") == "m-F32.gguf"
    assert ("HEAD", "/org/multi/resolve/main/m-F32.gguf") in hub.requests[seen:]  # (same bytes: one blob)
    # the repository alone asks the hub, which has two models: ambiguous, whatever the cache holds
    assert _resolve(env, "hf://org/multi").startswith("AmbiguousModel Model hf://org/multi matches several")


def test_models_lists_the_cached_ggufs(tmp_path: Path, hub: FakeHub, tiny_model: Path) -> None:
    env = _env(tmp_path, hub)
    for spec in ("org/tiny", "org/split", "hf://org/multi:F32"):
        assert _cli(env, "pull", spec).returncode == 0
    listed = _cli(env, "models", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = {row["spec"]: row for row in json.loads(listed.stdout)}
    assert set(rows) == {
        "hf://org/tiny/tiny-F32.gguf",
        "hf://org/split/tiny-00001-of-00003.gguf",
        "hf://org/multi/m-F32.gguf",
    }
    split = rows["hf://org/split/tiny-00001-of-00003.gguf"]
    assert split["parts"] == 3 and split["architecture"] == "llama" and split["quant"] == "F32"
    assert split["size"] == sum(p.stat().st_size for p in _snapshot_of(tmp_path, "org/split").iterdir())
    assert rows["hf://org/tiny/tiny-F32.gguf"]["size"] == tiny_model.stat().st_size
    table = _cli(env, "models").stdout
    assert "hf://org/split/tiny-00001-of-00003.gguf (3 parts)" in table and "llama" in table


# -- servers from hf:// specs -----------------------------------------------------------------------------

_START = """
import sys
from llama_proc import LlamaServer, LlamaServerArgs
with LlamaServer(LlamaServerArgs(model=sys.argv[1], n_ctx=256)) as server:
    reply = server.chat_completions({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    print(server.args.model)
    print(server.models()["data"][0]["id"])
    print(reply["usage"]["completion_tokens"])
"""


def _start(env: dict[str, str], spec: str, exe: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _START, spec],
        env={**env, "LLAMA_SERVER_PATH": str(exe)},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.integration
def test_server_starts_from_a_spec_then_from_the_cache_offline(tmp_path: Path, hub: FakeHub, llama_exe: Path) -> None:
    env = _env(tmp_path, hub)
    first = _start(env, "hf://org/tiny", llama_exe)  # downloads as it starts
    assert first.returncode == 0, first.stderr
    path, model_id, tokens = first.stdout.split()
    assert Path(path) == _snapshot_of(tmp_path, "org/tiny") / "tiny-F32.gguf"
    assert model_id == "org/tiny" and int(tokens) > 0
    assert hub.downloads() == ["/org/tiny/resolve/main/tiny-F32.gguf"]

    seen = len(hub.requests)
    again = _start(env, "hf://org/tiny/tiny-F32.gguf", llama_exe)
    assert again.returncode == 0, again.stderr
    assert len(hub.requests) == seen  # a cached model starts without asking the hub

    assert _cli(env, "pull", "org/split").returncode == 0
    hub.stop()  # from now on the hub cannot be reached
    split = _start(env, "hf://org/split", llama_exe)
    assert split.returncode == 0, split.stderr
    assert Path(split.stdout.split()[0]).name == "tiny-00001-of-00003.gguf"


@pytest.mark.integration
def test_a_spec_neither_on_the_hub_nor_cached_fails_fast(tmp_path: Path, hub: FakeHub, llama_exe: Path) -> None:
    env = _env(tmp_path, hub)
    hub.stop()
    started = time.monotonic()
    done = _start(env, "hf://org/tiny:F32", llama_exe)
    assert time.monotonic() - started < 30
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("llama_proc.errors.HubModelNotFound: Model hf://org/tiny:F32 not found: the hub cannot be")
    assert "llama-proc pull hf://org/tiny:F32" in last


_STOP_ALL = """
import sys, threading, time
from llama_proc import LlamaServer, LlamaServerArgs, StartupAborted, stop_all
server = LlamaServer(LlamaServerArgs(model=sys.argv[1]))
outcome = []
def start():
    try:
        server.start()
        outcome.append("started")
    except StartupAborted as exc:
        outcome.append("aborted: " + str(exc))
thread = threading.Thread(target=start)
thread.start()
from llama_proc.server import owned_servers
while server not in owned_servers():     # the download is under way (the hub answers slowly)
    time.sleep(0.01)
time.sleep(float(sys.argv[2]))
stop_all()
thread.join(60)
print(outcome[0])
print(server.pid)
"""


@pytest.mark.integration
def test_stop_all_during_a_download_starts_no_server(
    tmp_path: Path, hub_repos: dict[str, dict[str, Path]], llama_exe: Path
) -> None:
    with FakeHub(hub_repos, delay=3.0) as slow:
        done = subprocess.run(
            [sys.executable, "-c", _STOP_ALL, "hf://org/tiny", "1.5"],
            env={**_env(tmp_path, slow), "LLAMA_SERVER_PATH": str(llama_exe)},
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert slow.downloads() == ["/org/tiny/resolve/main/tiny-F32.gguf"]
    assert done.returncode == 0, done.stderr
    outcome, pid = done.stdout.split("\n")[:2]
    assert outcome.startswith("aborted: ") and "stop_all() was called while hf://org/tiny was downloading" in outcome
    assert pid == "None"
    # the download itself finished into the cache: the next start uses it
    assert (_snapshot_of(tmp_path, "org/tiny") / "tiny-F32.gguf").is_file()


_STOP_LOADING = """
import sys, threading, time
from llama_proc import LlamaServer, LlamaServerArgs, ServerManager, StartupAborted
from llama_proc.server import owned_servers

def call(fn, outcome):
    try:
        fn()
        outcome.append("served")
    except StartupAborted:
        outcome.append("aborted")

def scenario(name, target, stop):
    outcome = []
    thread = threading.Thread(target=call, args=(target, outcome))
    thread.start()
    while not owned_servers():           # the download is under way (the hub answers slowly)
        time.sleep(0.01)
    started = time.monotonic()
    stop()
    took = time.monotonic() - started
    thread.join(60)
    print(name, outcome[0], "%.1f" % took, len(owned_servers()))

request = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
auto = LlamaServer(LlamaServerArgs(model=sys.argv[1]), autostart=True)
scenario("autostart", lambda: auto.chat_completions(request), auto.stop)
manager = ServerManager()
manager.register("tiny", {"model": sys.argv[2]})
scenario("manager", lambda: manager.chat_completions({**request, "model": "tiny"}), manager.close)
"""


@pytest.mark.integration
def test_stopping_while_a_model_downloads_does_not_wait_and_leaves_no_server(
    tmp_path: Path, hub_repos: dict[str, dict[str, Path]], llama_exe: Path
) -> None:
    with FakeHub(hub_repos, delay=3.0) as slow:
        done = subprocess.run(
            [sys.executable, "-c", _STOP_LOADING, "hf://org/tiny", "hf://org/split"],
            env={**_env(tmp_path, slow), "LLAMA_SERVER_PATH": str(llama_exe)},
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = [line.split() for line in done.stdout.splitlines()]
    assert [(name, outcome, servers) for name, outcome, _, servers in lines] == [
        ("autostart", "aborted", "0"),
        ("manager", "aborted", "0"),
    ]
    assert all(float(took) < 1.0 for _, _, took, _ in lines), lines  # stop() did not wait for the download


def test_a_second_download_ending_leaves_a_starting_server_to_stop_all(
    fake_exe: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two first calls on an autostart hf:// server: the second one's download ends while the
    first one's server loads; stop_all() still finds and stops that server."""
    import threading

    import llama_proc.server as server_module
    from llama_proc import LlamaServer, stop_all
    from llama_proc.errors import StartupAborted
    from llama_proc.server import owned_servers

    monkeypatch.setenv("FAKE_MODE", "slow-load")
    monkeypatch.setenv("FAKE_LOAD_SECONDS", "3")
    second_done = threading.Event()

    def resolve(model: HubModel, **kwargs: object) -> Path:  # both download; the second one longer
        second = threading.current_thread().name == "second"
        time.sleep(0.8 if second else 0.1)
        if second:
            second_done.set()
        return tiny_model

    monkeypatch.setattr(server_module, "resolve_model", resolve)
    server = LlamaServer(fake_exe, LlamaServerArgs(model="hf://org/tiny"), autostart=True)
    outcomes: dict[str, str] = {}

    def first_call(name: str) -> None:
        try:
            server.ensure_started()
            outcomes[name] = "started"
        except StartupAborted:
            outcomes[name] = "aborted"

    threads = [threading.Thread(target=first_call, args=(n,), name=n) for n in ("first", "second")]
    for thread in threads:
        thread.start()
    try:
        assert second_done.wait(10)
        time.sleep(0.2)  # the first call's server is loading now
        assert server in owned_servers()
        stop_all()
        for thread in threads:
            thread.join(20)
        assert not server.is_running() and outcomes.get("first") == "aborted", outcomes
    finally:
        server.stop()
