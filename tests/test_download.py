"""Downloads against a local fake Hub: full, resumed, corrupted, missing, unreachable. No real hosts."""

from __future__ import annotations

import hashlib
import http.server
import socket
import threading

import pytest

from microft.download import FILES, REPOS, default_cache_dir, download, is_downloaded, resolve_endpoint
from microft.errors import DownloadError

WEIGHTS = bytes(range(256)) * 4096  # 1 MiB: more than one read chunk
CONFIG = b'{"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12}'
REPO = REPOS["gpt2"]


class FakeHub(http.server.ThreadingHTTPServer):
    """Serves REPO like the Hub: config.json directly with a git-sha1 ETag; model.safetensors as a
    302 to a CDN path carrying X-Linked-Etag (sha256) and X-Linked-Size, the CDN honouring Range."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.files = {"config.json": CONFIG, "model.safetensors": WEIGHTS}
        self.advertised_sha256 = hashlib.sha256(WEIGHTS).hexdigest()
        self.honour_range = True
        self.cut_after: int | None = None  # close the connection after this many body bytes, once
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(http.server.BaseHTTPRequestHandler):
    server: FakeHub

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        hub = self.server
        hub.requests.append((self.path, self.headers.get("Range")))
        prefix = f"/{REPO}/resolve/main/"
        if self.path == prefix + "model.safetensors":
            self.send_response(302)
            self.send_header("Location", "/cdn/model.safetensors")
            self.send_header("X-Linked-Etag", f'"{hub.advertised_sha256}"')
            self.send_header("X-Linked-Size", str(len(WEIGHTS)))
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == prefix + "config.json":
            self._send_body(hub.files["config.json"], etag=f'"{hashlib.sha1(CONFIG).hexdigest()}"')
        elif self.path == "/cdn/model.safetensors":
            self._send_body(hub.files["model.safetensors"])
        else:
            self.send_error(404, "Entry not found")

    def _send_body(self, data: bytes, etag: str | None = None) -> None:
        hub = self.server
        rng = self.headers.get("Range")
        start = int(rng.removeprefix("bytes=").rstrip("-")) if rng and hub.honour_range else 0
        if start >= len(data) and start:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        if etag:
            self.send_header("ETag", etag)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = data[start:]
        if hub.cut_after is not None:
            body, hub.cut_after = body[: hub.cut_after], None
            self.wfile.write(body)
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    """A proxy from the environment must not see (or forward) the test's requests."""
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def hub():
    server = FakeHub()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_full_download(hub, tmp_path):
    seen = []
    d = download("gpt2", cache_dir=tmp_path, endpoint=hub.url, progress=lambda *a: seen.append(a))
    assert d == tmp_path / "gpt2"
    assert (d / "model.safetensors").read_bytes() == WEIGHTS
    assert (d / "config.json").read_bytes() == CONFIG
    assert not list(d.glob("*.part"))
    assert is_downloaded("gpt2", tmp_path)
    assert seen[-1] == ("config.json", len(CONFIG), len(CONFIG))
    assert ("model.safetensors", len(WEIGHTS), len(WEIGHTS)) in seen
    hub.requests.clear()
    download("gpt2", cache_dir=tmp_path, endpoint=hub.url)  # complete files are not fetched again
    assert hub.requests == []


def test_resume_from_truncated_part(hub, tmp_path):
    d = tmp_path / "gpt2"
    d.mkdir()
    (d / "model.safetensors.part").write_bytes(WEIGHTS[:300_000])
    download("gpt2", cache_dir=tmp_path, endpoint=hub.url)
    assert (d / "model.safetensors").read_bytes() == WEIGHTS
    assert ("/cdn/model.safetensors", "bytes=300000-") in hub.requests


def test_interrupted_transfer_resumes_on_next_run(hub, tmp_path):
    hub.cut_after = 500_000
    with pytest.raises(DownloadError, match="run again to resume"):
        download("gpt2", cache_dir=tmp_path, endpoint=hub.url)
    part = tmp_path / "gpt2" / "model.safetensors.part"
    assert part.stat().st_size == 500_000
    download("gpt2", cache_dir=tmp_path, endpoint=hub.url)
    assert (tmp_path / "gpt2" / "model.safetensors").read_bytes() == WEIGHTS


def test_server_ignoring_range_restarts_cleanly(hub, tmp_path):
    hub.honour_range = False
    d = tmp_path / "gpt2"
    d.mkdir()
    (d / "model.safetensors.part").write_bytes(b"x" * 1000)
    download("gpt2", cache_dir=tmp_path, endpoint=hub.url)
    assert (d / "model.safetensors").read_bytes() == WEIGHTS


def test_oversized_part_starts_over(hub, tmp_path):
    d = tmp_path / "gpt2"
    d.mkdir()
    (d / "model.safetensors.part").write_bytes(WEIGHTS + b"extra")  # server answers 416
    download("gpt2", cache_dir=tmp_path, endpoint=hub.url)
    assert (d / "model.safetensors").read_bytes() == WEIGHTS


def test_hash_mismatch(hub, tmp_path):
    hub.files["model.safetensors"] = WEIGHTS[:-1] + b"\x00"
    with pytest.raises(DownloadError, match="sha256 mismatch") as e:
        download("gpt2", cache_dir=tmp_path, endpoint=hub.url)
    assert "\n" not in str(e.value)
    d = tmp_path / "gpt2"
    assert not (d / "model.safetensors").exists() and not (d / "model.safetensors.part").exists()


def test_404(hub, tmp_path):
    hub.files = {}
    with pytest.raises(DownloadError, match="404"):
        download("gpt2-medium", cache_dir=tmp_path, endpoint=hub.url)  # not served by the fake hub
    assert not (tmp_path / "gpt2-medium" / "config.json").exists()


def test_unreachable_endpoint(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DownloadError) as e:
        download("gpt2", cache_dir=tmp_path, endpoint=f"http://127.0.0.1:{port}")
    msg = str(e.value)
    assert msg.startswith(f"cannot reach http://127.0.0.1:{port}/") and "--endpoint" in msg and "--model DIR" in msg
    assert "\n" not in msg


def test_unknown_model(tmp_path):
    with pytest.raises(DownloadError, match="gpt2-xl"):
        download("gpt3", cache_dir=tmp_path, endpoint="http://127.0.0.1:9")


def test_endpoint_and_cache_defaults(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_ENDPOINT", "http://mirror.invalid/")
    assert resolve_endpoint() == "http://mirror.invalid"
    assert resolve_endpoint("http://other.invalid") == "http://other.invalid"
    monkeypatch.delenv("HF_ENDPOINT")
    assert resolve_endpoint() == "https://huggingface.co"
    monkeypatch.setenv("MICROFT_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "models"
    assert set(FILES) == {"config.json", "model.safetensors"}
