"""Download the released GPT-2 weights from the Hugging Face Hub (or a mirror) with urllib only.

Each file is fetched from `{endpoint}/{repo}/resolve/main/{file}` into `<file>.part`, resumed
with an HTTP `Range` request when a `.part` is already there, checked against the announced
size and, for LFS files, against the sha256 the Hub sends as `X-Linked-Etag`, then renamed
into place. A file that is already in place is complete (only verified files are renamed) and
is not fetched again. `config.json` is fetched last, so a directory with one is complete.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from microft.errors import DownloadError, one_line

REPOS = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
}
FILES = ("model.safetensors", "config.json")
DEFAULT_ENDPOINT = "https://huggingface.co"
CHUNK = 1 << 20
TIMEOUT_S = 30.0
OFFLINE_HINT = "you are offline? use --endpoint or copy an HF directory and pass --model DIR"
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")

# progress(file name, bytes done, total bytes or None), called after every chunk
Progress = Callable[[str, int, "int | None"], None]


def resolve_endpoint(endpoint: str | None = None) -> str:
    """`endpoint`, else $HF_ENDPOINT, else the Hub; without a trailing slash."""
    return (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def default_cache_dir() -> Path:
    """Where models are kept: `$MICROFT_CACHE/models`, else `~/.cache/microft/models`."""
    root = os.environ.get("MICROFT_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "microft") / "models"


def model_dir(name: str, cache_dir: str | Path | None = None) -> Path:
    """The directory `download(name, cache_dir)` fills."""
    return Path(cache_dir or default_cache_dir()) / name


def is_downloaded(name: str, cache_dir: str | Path | None = None) -> bool:
    d = model_dir(name, cache_dir)
    return all((d / f).is_file() for f in FILES)


def download(
    name: str,
    cache_dir: str | Path | None = None,
    endpoint: str | None = None,
    progress: Progress | None = None,
) -> Path:
    """Fetch `config.json` and `model.safetensors` of a GPT-2 release; returns the model directory.

    `name` is one of gpt2, gpt2-medium, gpt2-large, gpt2-xl; files go to `<cache_dir>/<name>/`
    (`cache_dir` defaults to `default_cache_dir()`). Safe to interrupt and run again.
    """
    if name not in REPOS:
        raise DownloadError(f"unknown model {name!r}; downloadable models: {', '.join(REPOS)}")
    base = resolve_endpoint(endpoint)
    if not base.startswith(("http://", "https://")):
        raise DownloadError(f"endpoint must be an http(s) URL, got {base!r}")
    target = model_dir(name, cache_dir)
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DownloadError(f"cannot create {target}: {e.strerror or e}") from None
    for file in FILES:
        if not (target / file).is_file():
            fetch_file(f"{base}/{REPOS[name]}/resolve/main/{file}", target / file, progress)
    return target


class _RecordingRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects like urllib does, keeping each hop's headers: the Hub puts the LFS
    sha256 (`X-Linked-Etag`) and size (`X-Linked-Size`) on the redirect, not on the CDN reply."""

    def __init__(self) -> None:
        self.hops: list[http.client.HTTPMessage] = []

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        self.hops.append(headers)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _sha256_from_etag(value: str | None) -> str | None:
    if not value:
        return None
    tag = value.strip().removeprefix("W/").strip('"').lower()
    return tag if SHA256_RE.match(tag) else None


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """(first byte, total size) of a `Content-Range: bytes a-b/total` header."""
    m = re.match(r"bytes\s+(\d+)-\d+/(\d+|\*)", value or "")
    if not m:
        return None, None
    return int(m.group(1)), (int(m.group(2)) if m.group(2) != "*" else None)


def _open(url: str, offset: int) -> tuple[http.client.HTTPResponse, list[http.client.HTTPMessage]]:
    headers = {"User-Agent": "microft", "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    redirects = _RecordingRedirects()
    opener = urllib.request.build_opener(redirects)
    try:
        resp = opener.open(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if e.code == 416:  # our .part is not a prefix of this file (longer, or it changed)
            raise
        hint = " (no such model file there)" if e.code == 404 else ""
        if e.code in (401, 403):
            hint = " (the endpoint refused access)"
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}{hint}") from None
    except urllib.error.URLError as e:
        reason = e.reason.strerror if isinstance(e.reason, OSError) and e.reason.strerror else e.reason
        raise DownloadError(f"cannot reach {url}: {reason}; {OFFLINE_HINT}") from None
    except (TimeoutError, OSError, http.client.HTTPException) as e:
        raise DownloadError(f"cannot reach {url}: {e or type(e).__name__}; {OFFLINE_HINT}") from None
    return resp, redirects.hops + [resp.headers]


def fetch_file(url: str, dest: Path, progress: Progress | None = None) -> None:
    """Download `url` to `dest` via `dest.part`, resuming, size- and sha256-checked, renamed atomically."""
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if part.exists() else 0
    try:
        resp, hops = _open(url, offset)
    except urllib.error.HTTPError:  # 416: start over once
        part.unlink(missing_ok=True)
        offset = 0
        resp, hops = _open(url, offset)
    with resp:
        # the endpoint's own headers only: a CDN's ETag may be some other 64-hex hash
        tags = [h.get("X-Linked-Etag") for h in hops] + [hops[0].get("ETag")]
        sha256 = next((s for t in tags if (s := _sha256_from_etag(t))), None)
        linked_size = next((n for h in hops if (n := _int(h.get("X-Linked-Size"))) is not None), None)
        length = _int(resp.headers.get("Content-Length"))
        if resp.status == 206:
            start, total = _content_range(resp.headers.get("Content-Range"))
            if start != offset:
                raise DownloadError(f"{url}: server resumed at byte {start}, expected {offset}; delete {part}")
        else:  # 200: the server sent the whole file (it ignored Range, or we asked for none)
            offset, total = 0, length
        total = linked_size if linked_size is not None else total
        if total is None and length is not None:
            total = offset + length
        hasher = hashlib.sha256() if sha256 else None
        if hasher and offset:
            with open(part, "rb") as f:
                while block := f.read(CHUNK):
                    hasher.update(block)
        done = offset
        with open(part, "ab" if offset else "wb") as f:
            while True:
                try:
                    block = resp.read(CHUNK)
                except (TimeoutError, OSError, http.client.HTTPException) as e:
                    f.flush()
                    raise DownloadError(
                        f"download of {url} interrupted after {done} bytes ({one_line(e, limit=None)}); run again to resume"
                    ) from None
                if not block:
                    break
                try:
                    f.write(block)
                except OSError as e:
                    raise DownloadError(f"cannot write {part}: {e.strerror or e}") from None
                if hasher:
                    hasher.update(block)
                done += len(block)
                if progress:
                    progress(dest.name, done, total)
            f.flush()
            os.fsync(f.fileno())
    if total is not None and done != total:
        if done > total:
            part.unlink(missing_ok=True)
        raise DownloadError(f"{url}: got {done} bytes, expected {total}; run again to resume")
    if hasher and hasher.hexdigest() != sha256:
        part.unlink(missing_ok=True)
        raise DownloadError(f"{url}: sha256 mismatch (got {hasher.hexdigest()[:12]}…, expected {sha256[:12]}…); "
                            "the partial file was deleted, run again")
    os.replace(part, dest)

