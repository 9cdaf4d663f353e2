"""A local stand-in for the Hugging Face Hub's download endpoints, for the download tests.

It answers what `huggingface_hub` asks: `GET /api/models/{repo}/revision/{rev}` (siblings with
sizes, git blob ids and LFS sha256s) and `.../tree/{rev}` (the same as a file listing),
`HEAD`/`GET /{repo}/resolve/{rev}/{file}` (regular files directly with a git-sha1 ETag; LFS files as a 302
to `/cdn/{sha256}` carrying X-Linked-Etag and X-Linked-Size) and the CDN with Range support; a dataset repo
is `repos["datasets/ORG/NAME"]`. Knobs let a test cut a transfer short, corrupt a file, gate a repo, or log
every request.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
import urllib.parse
from dataclasses import dataclass, field

LFS_SUFFIXES = (".safetensors", ".bin", ".model", ".gguf", ".onnx", ".pth")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    files: dict[str, bytes]
    commit: str = "0123456789abcdef0123456789abcdef01234567"
    token: str | None = None  # gated: only `Authorization: Bearer <token>` may read it
    corrupt: set[str] = field(default_factory=set)  # files served with one byte flipped

    def is_lfs(self, name: str) -> bool:
        return name.endswith(LFS_SUFFIXES)


class FakeHub(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.repos: dict[str, Repo] = {}
        self.cut_after: int | None = None  # close the next CDN body after this many bytes
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range)
        self.authorized: list[str] = []  # paths of requests that carried an Authorization header
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    @property
    def cdn_url(self) -> str:
        """Another host name for the same server: the client must see the CDN as off the Hub."""
        return f"http://localhost:{self.server_address[1]}/cdn"

    def blob(self, sha256: str) -> bytes | None:
        for repo in self.repos.values():
            for name, data in repo.files.items():
                if hashlib.sha256(data).hexdigest() == sha256:
                    return _flip(data) if name in repo.corrupt else data
        return None


def _flip(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 0xFF])


class _Handler(http.server.BaseHTTPRequestHandler):
    server: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_HEAD(self) -> None:
        self._route(body=False)

    def do_GET(self) -> None:
        self._route(body=True)

    def _route(self, body: bool) -> None:
        hub = self.server
        path = urllib.parse.urlsplit(self.path).path
        with hub.lock:
            hub.requests.append((self.command, self.path, self.headers.get("Range")))
            if self.headers.get("Authorization"):
                hub.authorized.append(path)
        if path.startswith("/api/datasets/"):  # a dataset repo is served as the repo "datasets/ORG/NAME"
            path = "/api/models/datasets/" + path.removeprefix("/api/datasets/")
        if path.startswith("/api/models/") and "/tree/" in path:  # snapshot_download's file listing
            repo_id, rev = path.removeprefix("/api/models/").split("/tree/", 1)
            return self._tree(repo_id, urllib.parse.unquote(rev), body)
        if path.startswith("/api/models/") and "/revision/" in path:
            repo_id, rev = path.removeprefix("/api/models/").split("/revision/", 1)
            return self._api(repo_id, urllib.parse.unquote(rev), body)
        if path.startswith("/cdn/"):
            data = hub.blob(path.removeprefix("/cdn/"))
            if data is None:
                return self._error(404, "EntryNotFound")
            return self._send_data(data, body, cdn=True)
        if "/resolve/" in path:
            repo_id, rest = path.lstrip("/").split("/resolve/", 1)
            rev, _, name = rest.partition("/")
            return self._resolve(repo_id, urllib.parse.unquote(rev), urllib.parse.unquote(name), body)
        self._error(404, "RepoNotFound")

    def _repo(self, repo_id: str, rev: str) -> Repo | None:
        repo = self.server.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", f"Repository Not Found for url: {self.path}.")
            return None
        if repo.token is not None:
            auth = self.headers.get("Authorization")
            if auth is None:
                self._error(401, "GatedRepo", f"Access to model {repo_id} is restricted. You must have "
                                              "access to it and be authenticated to access it. "
                                              "Please log in.")
                return None
            if auth != f"Bearer {repo.token}":
                self._error(403, "GatedRepo", f"Access to model {repo_id} is restricted and you are not in "
                                              "the authorized list.")
                return None
        if rev not in ("main", repo.commit):
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            return None
        return repo

    def _api(self, repo_id: str, rev: str, body: bool) -> None:
        repo = self._repo(repo_id, rev)
        if repo is None:
            return
        siblings = []
        for name, data in repo.files.items():
            s = {"rfilename": name, "size": len(data), "blobId": git_blob_sha1(data)}
            if repo.is_lfs(name):
                s["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            siblings.append(s)
        info = {"_id": "x", "id": repo_id, "modelId": repo_id, "sha": repo.commit, "private": False,
                "gated": "manual" if repo.token else False, "siblings": siblings, "tags": [], "downloads": 0,
                "likes": 0}
        self._send_data(json.dumps(info).encode(), body, headers={"Content-Type": "application/json"})

    def _tree(self, repo_id: str, rev: str, body: bool) -> None:
        repo = self._repo(repo_id, rev)
        if repo is None:
            return
        entries = []
        for name, data in repo.files.items():
            e = {"type": "file", "path": name, "size": len(data), "oid": git_blob_sha1(data)}
            if repo.is_lfs(name):
                e["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            entries.append(e)
        self._send_data(json.dumps(entries).encode(), body, headers={"Content-Type": "application/json"})

    def _resolve(self, repo_id: str, rev: str, name: str, body: bool) -> None:
        repo = self._repo(repo_id, rev)
        if repo is None:
            return
        data = repo.files.get(name)
        if data is None:
            return self._error(404, "EntryNotFound", f"{name} does not exist on \"{rev}\"",
                               commit=repo.commit)
        headers = {"X-Repo-Commit": repo.commit}
        if repo.is_lfs(name):
            sha = hashlib.sha256(data).hexdigest()
            self.send_response(302)
            for k, v in {**headers, "Location": f"{self.server.cdn_url}/{sha}", "ETag": f'"{sha}"',
                         "X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(data)),
                         "Content-Length": "0"}.items():
                self.send_header(k, v)
            self.end_headers()
            return
        served = _flip(data) if name in repo.corrupt else data
        self._send_data(served, body, headers={**headers, "ETag": f'"{git_blob_sha1(data)}"'})

    def _send_data(self, data: bytes, body: bool, headers: dict[str, str] | None = None,
                   cdn: bool = False) -> None:
        hub = self.server
        rng = self.headers.get("Range")
        start = int(rng.removeprefix("bytes=").split("-")[0]) if rng else 0
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data) - start))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if not body:
            return
        chunk = data[start:]
        with hub.lock:
            cuts_here = cdn and hub.cut_after is not None
            cut, hub.cut_after = (hub.cut_after, None) if cuts_here else (None, hub.cut_after)
        if cut is not None:
            self.wfile.write(chunk[:cut])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(chunk)

    def _error(self, code: int, error_code: str, message: str = "", commit: str | None = None) -> None:
        payload = json.dumps({"error": message or error_code}).encode()
        self.send_response(code)
        self.send_header("X-Error-Code", error_code)
        self.send_header("X-Error-Message", message or error_code)
        if commit:
            self.send_header("X-Repo-Commit", commit)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)
