"""Downloads into the Hugging Face cache against a local fake hub (tests/fakehub.py); never the real one.

A tiny random GPT-2 saved by transformers in shards is the served repo, so the last tests can check
that transformers (offline, same cache) and microft's loader read what `download` wrote.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from microft.download import download, hub_cache_dir, is_repo_id, resolve_model_dir
from microft.errors import ConfigError, DownloadError
from tests.fakehub import FakeHub, Repo

REPO = "tiny-org/tiny-gpt2"


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory) -> dict[str, bytes]:
    """A random GPT-2 from transformers, sharded, plus files download must skip."""
    import torch

    transformers = pytest.importorskip("transformers")  # a plain install (CI) has no test references
    GPT2Config, GPT2LMHeadModel = transformers.GPT2Config, transformers.GPT2LMHeadModel

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny")
    model = GPT2LMHeadModel(GPT2Config(vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=2))
    model.save_pretrained(d / "sharded", max_shard_size="30KB")
    model.save_pretrained(d / "single")
    files = {p.name: p.read_bytes() for p in (d / "sharded").iterdir()}
    files["single/model.safetensors"] = (d / "single" / "model.safetensors").read_bytes()
    assert "model.safetensors.index.json" in files
    assert len([f for f in files if f.endswith(".safetensors")]) >= 3
    files["tokenizer_config.json"] = b'{"model_max_length": 32}'
    files["pytorch_model.bin"] = b"pickled weights, never fetched"
    files["onnx/model.onnx"] = b"onnx, never fetched"
    files["README.md"] = b"# tiny"  # and single/model.safetensors, an unsharded copy: never fetched
    return files


@pytest.fixture
def hub(tiny_files, tmp_path, monkeypatch):
    """The fake hub serving REPO, with HF_ENDPOINT and the cache pointed at it and tmp_path."""
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY",
                "HF_TOKEN", "HF_HUB_CACHE", "XDG_CACHE_HOME", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no stray saved token either
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    server = FakeHub()
    server.repos[REPO] = Repo(dict(tiny_files))
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def expected_files(files: dict[str, bytes]) -> set[str]:
    shards = set(json.loads(files["model.safetensors.index.json"])["weight_map"].values())
    return shards | {"model.safetensors.index.json", "config.json", "generation_config.json",
                     "tokenizer_config.json"}


def blobs(repo: str = REPO) -> Path:
    return hub_cache_dir() / ("models--" + repo.replace("/", "--")) / "blobs"


def test_sharded_download_fills_the_hf_cache(hub, tiny_files):
    seen = []
    snap = download(REPO, progress=lambda *a: seen.append(a))
    root = hub_cache_dir() / "models--tiny-org--tiny-gpt2"
    assert hub_cache_dir() == Path(os.environ["HF_HOME"]) / "hub"
    assert snap.commit == hub.repos[REPO].commit and snap.path == root / "snapshots" / snap.commit
    assert (root / "refs" / "main").read_text() == snap.commit
    got = {str(p.relative_to(snap.path)) for p in snap.path.rglob("*") if p.is_file()}
    assert got == expected_files(tiny_files) == set(snap.files)
    assert snap.files[-1] == "config.json"
    for name in got:
        link = snap.path / name
        assert link.is_symlink() and link.resolve().parent == root / "blobs"
        assert link.read_bytes() == tiny_files[name]
    assert not list(root.rglob("*.part")) and not list(root.rglob("*.incomplete"))
    assert snap.downloaded_bytes == sum(len(tiny_files[f]) for f in got)
    assert not any("pytorch_model.bin" in p or "onnx" in p or "README" in p or "single" in p
                   for _, p, _ in hub.requests)
    assert seen and all(done <= total for _, done, total in seen)

    hub.requests.clear()
    again = download(REPO)  # complete: one API call, nothing transferred
    assert again.path == snap.path and again.downloaded_bytes == 0
    assert [p.split("?")[0] for _, p, _ in hub.requests] == [f"/api/models/{REPO}/revision/main"]


def test_dropped_connection_resumes_with_range(hub, tiny_files):
    hub.cut_after = 5_000  # the first CDN transfer stops after 5000 bytes
    snap = download(REPO)
    resumed = [(p, r) for _, p, r in hub.requests if r]
    assert resumed and resumed[0][1] == "bytes=5000-"
    for name in snap.files:
        assert (snap.path / name).read_bytes() == tiny_files[name]


def test_part_file_of_an_interrupted_run_is_resumed(hub, tiny_files):
    shard = sorted(f for f in tiny_files if f.startswith("model-"))[0]
    sha = hashlib.sha256(tiny_files[shard]).hexdigest()
    blobs().mkdir(parents=True)
    (blobs() / f"{sha}.part").write_bytes(tiny_files[shard][:7_000])
    snap = download(REPO)
    assert (f"/cdn/{sha}", "bytes=7000-") in [(p, r) for _, p, r in hub.requests]
    assert (snap.path / shard).read_bytes() == tiny_files[shard]


@pytest.mark.parametrize("victim", ["model-00002-of-", "config.json"])
def test_hash_mismatch_is_refused_and_leaves_nothing(hub, tiny_files, victim):
    name = next(f for f in tiny_files if f.startswith(victim))
    hub.repos[REPO].corrupt.add(name)
    with pytest.raises(DownloadError, match=f"{name}: hash mismatch") as e:
        download(REPO)
    assert "\n" not in str(e.value)
    root = hub_cache_dir() / "models--tiny-org--tiny-gpt2"
    assert not (root / "refs" / "main").exists()
    assert not (root / "snapshots" / hub.repos[REPO].commit / name).exists()
    flipped = tiny_files[name][:-1] + bytes([tiny_files[name][-1] ^ 0xFF])
    assert all(p.read_bytes() != flipped for p in blobs().iterdir())
    assert not list(blobs().glob("*.part"))
    with pytest.raises(ConfigError, match="not in the local Hugging Face cache"):
        resolve_model_dir(REPO)


def test_gated_repo_needs_hf_token(hub, monkeypatch):
    hub.repos[REPO].token = "hf_secret"
    with pytest.raises(DownloadError, match="set HF_TOKEN") as e:
        download(REPO)
    assert "\n" not in str(e.value)
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(DownloadError, match="accept its licence"):
        download(REPO)
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    hub.requests.clear()
    snap = download(REPO)
    assert (snap.path / "config.json").is_file()
    # the token stays on the hub
    assert hub.authorized and not any(p.startswith("/cdn/") for p in hub.authorized)


def test_missing_repo_and_revision(hub):
    with pytest.raises(DownloadError, match="no such model repository") as e:
        download("tiny-org/nope")
    assert "\n" not in str(e.value)
    with pytest.raises(DownloadError, match="no revision 'v9'"):
        download(REPO, revision="v9")


def test_unreachable_endpoint(hub, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DownloadError, match=f"cannot reach http://127.0.0.1:{port}") as e:
        download(REPO, endpoint=f"http://127.0.0.1:{port}")
    assert "\n" not in str(e.value) and "HF_ENDPOINT" in str(e.value)


def test_full_disk_is_refused_before_writing(hub, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(DownloadError, match="not enough disk space"):
        download(REPO)
    assert not (hub_cache_dir() / "models--tiny-org--tiny-gpt2" / "refs").exists()


def test_alias_and_bad_specs(hub, tiny_files):
    hub.repos["openai-community/gpt2"] = Repo(dict(tiny_files))
    snap = download("gpt2")
    assert snap.repo_id == "openai-community/gpt2" and (snap.path / "config.json").is_file()
    with pytest.raises(DownloadError, match="not a repo id"):
        download("not a repo")


def test_resolve_model_dir_offline(hub, monkeypatch, tmp_path):
    assert resolve_model_dir("gpt2-tiny") is None  # a preset, not a repo id
    assert resolve_model_dir(str(tmp_path)) is None  # a path
    with pytest.raises(ConfigError, match=f"run `microft download {REPO}`") as e:
        resolve_model_dir(REPO)
    assert "\n" not in str(e.value)
    snap = download(REPO)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing is asked of any server
    hub.requests.clear()
    assert resolve_model_dir(REPO) == snap.path
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))  # HF_HUB_CACHE wins over HF_HOME
    with pytest.raises(ConfigError):
        resolve_model_dir(REPO)
    assert resolve_model_dir(REPO, cache_dir=tmp_path / "hf" / "hub") == snap.path
    assert hub.requests == []
    assert is_repo_id("Qwen/Qwen3-0.6B") and not is_repo_id("gpt2") and not is_repo_id("a/b/c")


def test_transformers_reads_the_download_offline(hub, tiny_files, tmp_path):
    snap = download(REPO)
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({REPO!r})\n"
        "print(sum(float(p.double().sum()) for p in m.parameters()))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub_cache_dir()),
           "HF_ENDPOINT": "http://127.0.0.1:9"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    from safetensors.numpy import load
    total = sum(float(t.astype("float64").sum()) for f in snap.files if f.endswith(".safetensors")
                for t in load(tiny_files[f]).values())
    assert abs(float(out.stdout.split()[-1]) - total) < 1e-3 * max(1.0, abs(total))


def test_microft_loads_a_repo_id(hub, tiny_files):
    from microft.memory.estimate import load_shape
    from microft.models.load import load_model, read_model_config

    single = {"config.json": tiny_files["config.json"],
              "model.safetensors": tiny_files["single/model.safetensors"]}
    hub.repos["tiny-org/single"] = Repo(single)
    with pytest.raises(ConfigError, match="microft download tiny-org/single"):
        load_shape("tiny-org/single")
    download("tiny-org/single")
    assert read_model_config("tiny-org/single").n_layer == 2
    assert load_shape("tiny-org/single").n_layer == 2
    model = load_model("tiny-org/single")
    assert model.config.n_embd == 32 and model.config.vocab_size == 96


def test_cli_download(hub):
    from microft.cli import app

    runner = CliRunner()
    r = runner.invoke(app, ["download", REPO])
    assert r.exit_code == 0, r.output
    lines = r.stdout.strip().splitlines()
    assert lines == [str(resolve_model_dir(REPO))]
    r = runner.invoke(app, ["download", REPO, "--json"])
    assert r.exit_code == 0
    info = json.loads(r.stdout)
    assert info["repo_id"] == REPO and info["path"] == lines[0] and info["downloaded_bytes"] == 0
    r = runner.invoke(app, ["download", "tiny-org/nope"])
    assert r.exit_code == 2 and "no such model repository" in r.output


def test_ids_the_hub_refuses_and_an_endpoint_that_is_not_a_hub_are_one_line(hub):
    """`--`/`..` inside an id passed microft's pattern and failed in huggingface_hub's check; a server that
    answers 200 with an HTML page (a proxy, a captive portal) or a JSON list was a traceback too."""
    import http.server

    for bad in ("org/m--x", "org/a..b"):
        with pytest.raises(DownloadError, match="is not a repo id"):
            download(bad)

    class Page(http.server.BaseHTTPRequestHandler):
        body = b"<html>sign in</html>"

        def do_GET(self):  # noqa: N802 (http.server's name)
            self.send_response(200)
            self.send_header("Content-Length", str(len(self.body)))
            self.end_headers()
            self.wfile.write(self.body)

        def log_message(self, *args):
            pass

    for body in (b"<html>sign in</html>", b"[]"):
        Page.body = body
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            with pytest.raises(DownloadError, match="did not answer like a Hugging Face hub"):
                download(REPO, endpoint=f"http://127.0.0.1:{server.server_address[1]}")
        finally:
            server.shutdown()


# --------------------------------------------------------------------------- estimate-mem without a download


def test_estimate_mem_of_an_uncached_repo_fetches_only_its_config(hub, tiny_files, tmp_path, monkeypatch):
    """Planning costs config.json, not the weights; it is kept in microft's own cache (a snapshot with
    config.json in the shared cache would read as a finished `microft download`), and found again offline."""
    from microft.cli import app

    monkeypatch.setenv("MICROFT_CACHE", str(tmp_path / "microft"))
    args = ["estimate-mem", "--model", REPO, "--micro-bs", "2", "--seq-len", "32", "--json"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["estimated"].startswith(f"{REPO}: micro-bs 2 × seq 32")
    config = json.loads(tiny_files["config.json"])
    assert d["details"]["parameters"] == (config["vocab_size"] * 32 + 32 * 32 + 2 * (12 * 32 * 32 + 13 * 32)
                                          + 2 * 32)
    fetched = {p.rsplit("/", 1)[-1] for m, p, _ in hub.requests if "/resolve/" in p}
    assert fetched == {"config.json"} and not any(p.startswith("/cdn/") for _, p, _ in hub.requests)
    with pytest.raises(ConfigError, match="microft download"):  # the shared cache still lacks the model
        resolve_model_dir(REPO)
    assert list((tmp_path / "microft" / "hub-configs").rglob("config.json"))
    hub.requests.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # planned again offline: the copy fetched before
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["peak_bytes"] == d["peak_bytes"] and not hub.requests


@pytest.mark.parametrize("offline", [True, False])
def test_estimate_mem_names_the_preset_when_the_config_cannot_be_fetched(hub, tmp_path, monkeypatch, offline):
    """Offline, or a repo that refuses (gated here): one line that names the preset of the same shapes."""
    from microft.cli import app

    monkeypatch.setenv("MICROFT_CACHE", str(tmp_path / "microft"))
    hub.repos["meta-llama/Llama-3.1-8B"] = Repo({"config.json": b"{}"}, token="hf_secret")
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = CliRunner().invoke(app, ["estimate-mem", "--model", "meta-llama/Llama-3.1-8B"])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "Traceback" not in r.output, r.output
    assert r.output.rstrip().endswith("plan with the preset of its shapes: --model llama-3.1-8b"), r.output
    assert ("HF_HUB_OFFLINE is set" in r.output) == offline and ("gated" in r.output) != offline
    assert (not hub.requests if offline
            else all("config.json" in p or "/api/" in p for _, p, _ in hub.requests))
    r = CliRunner().invoke(app, ["estimate-mem", "--model", "tiny-org/no-preset-like-it"])
    assert r.exit_code == 2 and "run `microft download tiny-org/no-preset-like-it`" in r.output, r.output


@pytest.mark.parametrize("repo, preset", [
    ("meta-llama/Llama-3.1-8B", "llama-3.1-8b"), ("meta-llama/Llama-3.1-8B-Instruct", "llama-3.1-8b"),
    ("meta-llama/Meta-Llama-3.1-8B", "llama-3.1-8b"), ("meta-llama/Llama-3.2-1B-Instruct", "llama-3.2-1b"),
    ("Qwen/Qwen3-0.6B-Base", "qwen3-0.6b"), ("Qwen/Qwen2.5-7B-Instruct", "qwen2.5-7b"),
    ("HuggingFaceTB/SmolLM2-360M-Instruct", "smollm2-360m"),
    ("mistralai/Mistral-7B-Instruct-v0.2", "mistral-7b"), ("openai-community/gpt2-medium", "gpt2-medium"),
    ("mistralai/Mistral-7B-Instruct-v0.3", None),  # another vocabulary than the preset's
    ("meta-llama/Meta-Llama-3-8B", None), ("someone/gpt2-tiny", None), ("someone/my-model", None),
])
def test_preset_for_repo(repo, preset):
    from microft.models.config import preset_for_repo

    assert preset_for_repo(repo) == preset
