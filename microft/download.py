"""Hub repos in the shared Hugging Face cache: download them, and find them again offline.

`download("Qwen/Qwen3-0.6B")` fills `$HF_HUB_CACHE/models--Qwen--Qwen3-0.6B/` exactly as
`huggingface_hub` would (blobs/<etag>, snapshots/<commit>/<file> links, refs/<revision>), so
transformers and microft read the same files. `huggingface_hub` does the API call, the auth and
the snapshot links; the bytes go through microft's own transfer, because huggingface_hub 2.x
restarts an interrupted file from zero and checks only its size. Ours keeps `blobs/<etag>.part`
across runs, resumes it with an HTTP Range request, and renames it into place only once its size
and hash match (sha256 for LFS files, the git blob sha1 for the rest): a blob is complete or absent.
`refs/<revision>` is written last, so a reference always names a finished snapshot.

`resolve_model_dir("Qwen/Qwen3-0.6B")` finds that snapshot again without the network, the way
transformers does (refs/main -> snapshots/<commit>).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import json
import os
import re
import shutil
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from microft.errors import DownloadError, one_line
from microft.models.source import (  # noqa: F401  (is_repo_id, resolve_model_dir: re-exported)
    REPO_ID_RE,
    hub_cache_dir,
    is_repo_id,
    repo_dir,
    resolve_model_dir,
)

ALIASES = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
}
DEFAULT_ENDPOINT = "https://huggingface.co"
# what a model needs besides its weights; each is fetched when the repo has it
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "chat_template.jinja", "vocab.json", "merges.txt", "added_tokens.json",
                   "original/tokenizer.model")
# weights in order of preference: the first kind the repo has is the only one fetched
WEIGHT_KINDS = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                "pytorch_model.bin")
CHUNK = 1 << 20
TIMEOUT_S = 30.0
RETRIES = 5  # automatic resumes of one file within a run, while each attempt makes progress
OFFLINE_HINT = "offline? set HF_ENDPOINT to a mirror, or pass a local model directory to --model"

# progress(file name, bytes done, total bytes), called after every chunk
Progress = Callable[[str, int, int], None]


@dataclass
class Snapshot:
    """What `download` fetched: the repo at one commit, in the cache."""

    repo_id: str
    revision: str
    commit: str
    path: Path  # snapshots/<commit>: pass it (or the repo id) to --model or from_pretrained
    files: list[str] = field(default_factory=list)
    downloaded_bytes: int = 0  # 0 when everything was already in the cache

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "path": str(self.path)}


def config_cache_dir() -> Path:
    """Where `fetch_config` keeps the config.json files it fetched: microft's own cache
    ($MICROFT_CACHE, else ~/.cache/microft), never the shared Hugging Face cache, where a snapshot
    holding config.json reads as a finished download."""
    root = os.environ.get("MICROFT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "microft")
    return Path(root) / "hub-configs"


def fetch_config(spec: str, revision: str = "main", endpoint: str | None = None,
                 token: str | None = None) -> Path:
    """A hub repo's `config.json` alone, through huggingface_hub (what planning needs: a few KB, not the
    weights); returns its path. Fetched once, then found offline; with HF_HUB_OFFLINE set only the copy
    fetched before is used. Failures are one-line DownloadErrors."""
    repo_id = ALIASES.get(spec, spec)
    base = resolve_endpoint(endpoint)
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "on", "yes", "true")
    with _hub_errors(repo_id, base, revision, token):
        from huggingface_hub import HfApi, hf_hub_download
        from huggingface_hub import errors as hf

        # one API call first: it fails at once offline, where the file request retries for ~20 s
        if not offline:
            HfApi(endpoint=base).model_info(repo_id, revision=revision, token=token)
        try:
            path = hf_hub_download(repo_id, "config.json", revision=revision, cache_dir=config_cache_dir(),
                                   endpoint=base, token=token, local_files_only=offline,
                                   etag_timeout=TIMEOUT_S)
        except (hf.LocalEntryNotFoundError, hf.OfflineModeIsEnabled):
            if offline:
                raise DownloadError("HF_HUB_OFFLINE is set and its config.json was never fetched") from None
            raise
    return Path(path)


def resolve_endpoint(endpoint: str | None = None) -> str:
    """`endpoint`, else $HF_ENDPOINT, else the Hub; without a trailing slash."""
    return (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def download(
    spec: str,
    revision: str = "main",
    endpoint: str | None = None,
    cache_dir: str | Path | None = None,
    token: str | None = None,
    progress: Progress | None = None,
) -> Snapshot:
    """Fetch a model repo's config, tokenizer files and weights into the Hugging Face cache.

    `spec` is a repo id or an alias (gpt2, gpt2-medium, gpt2-large, gpt2-xl). Safetensors are
    preferred: .bin weights are fetched only when a repo has no safetensors, and .pth, .gguf,
    ONNX and other files never. `token` defaults to $HF_TOKEN or the saved login. Safe to
    interrupt and run again: finished files are kept and a partial one resumes.
    """
    repo_id = ALIASES.get(spec, spec)
    if not REPO_ID_RE.match(repo_id):
        raise DownloadError(f"{spec!r} is not a repo id (org/name) or one of: {', '.join(ALIASES)}")
    base = resolve_endpoint(endpoint)
    if not base.startswith(("http://", "https://")):
        raise DownloadError(f"endpoint must be an http(s) URL, got {base!r}")
    cache = Path(cache_dir or hub_cache_dir())
    with _hub_errors(repo_id, base, revision, token):
        from huggingface_hub import HfApi

        info = HfApi(endpoint=base).model_info(repo_id, revision=revision, files_metadata=True, token=token)
        commit = info.sha
        sizes = {s.rfilename: s.size for s in info.siblings or []}
        first, weights_index = _select(repo_id, sizes)
        fetcher = _Fetcher(repo_id, commit, base, cache, token, progress)
        if weights_index:
            shards = _shards(fetcher.get(weights_index, sizes))
            missing = sorted(shards - sizes.keys())
            if missing:
                raise DownloadError(f"{repo_id}: {weights_index} lists {missing[0]}, which the repo lacks")
            first += [weights_index, *sorted(shards)]
        files = first + ["config.json"]  # last: a snapshot with config.json is complete
        needed = sum(sizes.get(f) or 0 for f in files if not fetcher.pointer(f).exists())
        _check_space(cache, needed)
        for f in files:
            fetcher.get(f, sizes)
    if revision != commit:
        _write_ref(repo_dir(repo_id, cache) / "refs" / revision, commit)
    return Snapshot(repo_id, revision, commit, fetcher.snapshot, files, fetcher.downloaded)


def _select(repo_id: str, sizes: dict[str, int | None]) -> tuple[list[str], str | None]:
    """The repo's files to fetch (the weights index aside, whose shards are read from it)."""
    if "config.json" not in sizes:
        raise DownloadError(f"{repo_id} has no config.json: not a transformers model repo")
    kind = next((k for k in WEIGHT_KINDS if k in sizes), None)
    if kind is None:
        raise DownloadError(f"{repo_id} has no model.safetensors or pytorch_model.bin weights microft "
                            "can read")
    files = [kind] if not kind.endswith(".index.json") else []
    files += [f for f in TOKENIZER_FILES + ("generation_config.json",) if f in sizes]
    return files, kind if kind.endswith(".index.json") else None


def _shards(index_path: Path) -> set[str]:
    try:
        return set(json.loads(index_path.read_text(encoding="utf-8"))["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise DownloadError(f"cannot read the weights index {index_path}: {e}") from None


def _check_space(cache: Path, needed: int) -> None:
    probe = cache
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed > free:
        raise DownloadError(f"not enough disk space in {cache}: the download needs {needed / 2**30:.2f} GiB, "
                            f"{free / 2**30:.2f} GiB free (set HF_HUB_CACHE to put the cache elsewhere)")


def _write_ref(path: Path, commit: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(commit)
    os.replace(tmp, path)


class _Fetcher:
    """One repo at one commit: each file into blobs/<etag> by our transfer, then linked by huggingface_hub."""

    def __init__(self, repo_id: str, commit: str, endpoint: str, cache: Path, token: str | None,
                 progress: Progress | None) -> None:
        self.repo_id, self.commit, self.endpoint, self.cache = repo_id, commit, endpoint, cache
        self.token, self.progress = token, progress
        self.snapshot = repo_dir(repo_id, cache) / "snapshots" / commit
        self.downloaded = 0

    def pointer(self, name: str) -> Path:
        return self.snapshot / name

    def get(self, name: str, sizes: dict[str, int | None]) -> Path:
        from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
        from huggingface_hub.utils import build_hf_headers

        if self.pointer(name).exists():  # huggingface_hub's rule: a linked file is complete
            return self.pointer(name)
        url = hf_hub_url(self.repo_id, name, revision=self.commit, endpoint=self.endpoint)
        meta = get_hf_file_metadata(url, token=self.token, endpoint=self.endpoint)
        if meta.etag is None or meta.size is None:
            raise DownloadError(f"{url}: the endpoint sent no ETag or size; is it a Hugging Face hub?")
        if sizes.get(name) is not None and sizes[name] != meta.size:
            raise DownloadError(f"{url}: the hub lists {sizes[name]} bytes but serves {meta.size}")
        blob = repo_dir(self.repo_id, self.cache) / "blobs" / meta.etag
        if not blob.exists():
            # the bearer token goes to the hub only, never to the CDN a file redirects to
            same_host = _netloc(meta.location) == _netloc(self.endpoint)
            auth = {k: v for k, v in build_hf_headers(token=self.token).items()
                    if k.lower() == "authorization"}
            self.downloaded += fetch_file(meta.location, blob, meta.size, meta.etag, name,
                                          auth if same_host else {}, self.progress)
        # the blob is there and verified: huggingface_hub links snapshots/<commit>/<name> to it
        return Path(hf_hub_download(self.repo_id, name, revision=self.commit, cache_dir=self.cache,
                                    endpoint=self.endpoint, token=self.token))


def _check_hash(path: Path, etag: str) -> str | None:
    """The file's hash when it does not match `etag` (LFS sha256 or git blob sha1), else None."""
    if re.fullmatch(r"[0-9a-f]{64}", etag):
        h = hashlib.sha256()
    elif re.fullmatch(r"[0-9a-f]{40}", etag):
        h = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    else:
        return None  # not a content hash: the size check alone applies
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return None if h.hexdigest() == etag else h.hexdigest()


def fetch_file(url: str, dest: Path, size: int, etag: str, name: str, headers: dict[str, str] | None = None,
               progress: Progress | None = None) -> int:
    """Download `url` to `dest` via `dest.part`, resuming, size- and hash-checked, renamed atomically.

    Returns the bytes transferred. A dropped connection resumes by itself up to RETRIES times;
    an interrupted run leaves the `.part` for the next run.
    """
    part = dest.with_name(dest.name + ".part")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DownloadError(f"cannot create {dest.parent}: {e.strerror or e}") from None
    moved, attempts = 0, 0
    while True:
        have = part.stat().st_size if part.exists() else 0
        if have > size:  # not a prefix of this file: start over
            part.unlink()
            have = 0
        if have < size:
            try:
                moved += _transfer(url, part, have, size, name, headers or {}, progress)
            except _Interrupted as e:
                attempts += 1
                if e.progressed and attempts <= RETRIES:
                    continue
                raise DownloadError(f"download of {name} interrupted at {part.stat().st_size} of "
                                    f"{size} bytes ({e}); run again to resume") from None
        bad = _check_hash(part, etag)
        if bad is not None:
            part.unlink(missing_ok=True)
            raise DownloadError(f"{name}: hash mismatch (got {bad[:12]}…, the hub says {etag[:12]}…); "
                                "the partial file was deleted, run again")
        os.replace(part, dest)
        return moved


class _Interrupted(Exception):
    def __init__(self, reason: str, progressed: bool) -> None:
        super().__init__(reason)
        self.progressed = progressed


def _netloc(url: str) -> str:
    return urllib.parse.urlsplit(url).netloc


class _AuthOnSameHost(urllib.request.HTTPRedirectHandler):
    """Follows redirects, dropping Authorization when the host changes."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and _netloc(newurl) != _netloc(req.full_url):
            new.remove_header("Authorization")
        return new


def _transfer(url: str, part: Path, have: int, size: int, name: str, headers: dict[str, str],
              progress: Progress | None) -> int:
    """Append bytes `have..size` of `url` to `part`; raises _Interrupted when the connection drops."""
    req = urllib.request.Request(url, headers={"User-Agent": "microft", "Accept-Encoding": "identity",
                                               **headers})
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        resp = urllib.request.build_opener(_AuthOnSameHost()).open(req, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if e.code == 416:  # the .part is not a prefix of this file
            part.unlink(missing_ok=True)
            raise _Interrupted("the server refused the resume", progressed=True) from None
        hint = " (set HF_TOKEN, or accept the model's licence on the hub)" if e.code in (401, 403) else ""
        raise DownloadError(f"{name}: HTTP {e.code} {e.reason} from {url.split('?')[0]}{hint}") from None
    except (urllib.error.URLError, TimeoutError, OSError, http.client.HTTPException) as e:
        raise _Interrupted(_reason(e), progressed=False) from None
    done = have
    with resp:
        if have and resp.status != 206:  # the server ignored Range and sends the whole file
            done = 0
        try:
            with open(part, "ab" if done else "wb") as f:
                while True:
                    try:
                        block = resp.read(CHUNK)
                    except (TimeoutError, OSError, http.client.HTTPException) as e:
                        raise _Interrupted(_reason(e), progressed=done > have) from None
                    if not block:
                        break
                    f.write(block)
                    done += len(block)
                    if progress:
                        progress(name, done, size)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise DownloadError(f"disk full while writing {part} ({done} of {size} bytes); "
                                    "free space and run again to resume") from None
            raise DownloadError(f"cannot write {part}: {e.strerror or e}") from None
    if done < size:
        raise _Interrupted(f"got {done} of {size} bytes", progressed=done > have)
    if done > size:
        part.unlink(missing_ok=True)
        raise DownloadError(f"{name}: the server sent {done} bytes, {size} expected; the partial file "
                            "was deleted")
    return done - have


def _reason(e: BaseException) -> str:
    r = getattr(e, "reason", None) or e
    text = (r.strerror if isinstance(r, OSError) and r.strerror else str(r)) or type(e).__name__
    return " ".join(text.split())


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The connection errors of whichever HTTP client this huggingface_hub uses."""
    found: list[type[BaseException]] = [OSError, TimeoutError]
    for module, attr in (("httpx2", "TransportError"), ("httpx", "TransportError"),
                         ("requests", "RequestException")):
        try:
            found.append(getattr(__import__(module), attr))
        except (ImportError, AttributeError):
            pass
    return tuple(found)


@contextlib.contextmanager
def _hub_errors(repo_id: str, endpoint: str, revision: str, token: str | None) -> Iterator[None]:
    """huggingface_hub's exceptions as one-line DownloadErrors."""
    from huggingface_hub import errors as hf

    access = (f"{repo_id} is gated or private: accept its licence on {endpoint}/{repo_id} with the account "
              "whose token is in HF_TOKEN" if token or os.environ.get("HF_TOKEN") else
              f"{repo_id} is gated or private: set HF_TOKEN to a token of an account that accepted its "
              f"licence on {endpoint}/{repo_id}")
    try:
        yield
    except DownloadError:
        raise
    except hf.GatedRepoError:
        raise DownloadError(access) from None
    except hf.RepositoryNotFoundError as e:
        code = e.response.status_code if e.response is not None else 404
        extra = "; if it is private, set HF_TOKEN" if code in (401, 403) else ""
        raise DownloadError(f"{repo_id}: no such model repository on {endpoint}{extra}") from None
    except hf.RevisionNotFoundError:
        raise DownloadError(f"{repo_id}: no revision {revision!r} on {endpoint}") from None
    except hf.LocalEntryNotFoundError as e:  # huggingface_hub's wrapper for a failed metadata request
        raise DownloadError(f"cannot reach {endpoint}: {one_line(e.__cause__ or e)}; "
                            f"{OFFLINE_HINT}") from None
    except hf.EntryNotFoundError as e:  # (after its subclass LocalEntryNotFoundError)
        raise DownloadError(f"{repo_id}: a listed file is missing on {endpoint} ({one_line(e)})") from None
    except hf.OfflineModeIsEnabled:
        raise DownloadError("HF_HUB_OFFLINE is set: unset it to download") from None
    except hf.HfHubHTTPError as e:
        code = e.response.status_code if e.response is not None else None
        if code in (401, 403):
            raise DownloadError(access) from None
        raise DownloadError(f"{endpoint}: HTTP {code} for {repo_id} ({one_line(e)})") from None
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise DownloadError(f"disk full: {e.strerror} ({e.filename or 'the cache'})") from None
        if isinstance(e, (ConnectionError, TimeoutError)):
            raise DownloadError(f"cannot reach {endpoint}: {_reason(e)}; {OFFLINE_HINT}") from None
        raise DownloadError(f"{repo_id}: {one_line(e)}") from None
    except _transport_errors() as e:
        raise DownloadError(f"cannot reach {endpoint}: {one_line(e)}; {OFFLINE_HINT}") from None
    # an id huggingface_hub refuses that REPO_ID_RE let through (`--`, `..`)
    except hf.HFValidationError as e:
        raise DownloadError(f"{repo_id!r} is not a repo id: {one_line(e)}") from None
    except (ValueError, TypeError, KeyError) as e:  # a 200 that is not the hub's JSON (a proxy's HTML page)
        raise DownloadError(f"{endpoint} did not answer like a Hugging Face hub for {repo_id} "
                            f"({type(e).__name__}: {one_line(e)}); check --endpoint / HF_ENDPOINT") from None
