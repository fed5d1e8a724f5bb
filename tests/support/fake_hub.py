"""A fake Hugging Face Hub on 127.0.0.1, speaking the HTTP protocol huggingface_hub 2.4.0 reads: model info
(`/api/models/{repo}[/revision/{rev}]`), the paginated tree listing snapshot_download uses, and HEAD/GET
`/{repo}/resolve/{rev}/{file}` with the headers file_download reads (X-Repo-Commit, ETag, X-Linked-Etag,
X-Linked-Size, Content-Length, Range -> 206), and errors as hf_raise_for_status maps them (X-Error-Code).

huggingface_hub reads every setting in huggingface_hub.constants once, at import: HF_ENDPOINT (ENDPOINT and the
resolve URL template), HF_HUB_DISABLE_XET, HF_HUB_OFFLINE, HF_HUB_CACHE / HF_HOME, HF_HUB_DOWNLOAD_TIMEOUT,
HF_HUB_ETAG_TIMEOUT. Set them before the first import (in a subprocess's environment), or use
`FakeHub.patch_env`, which also patches the already imported constants. Only HF_TOKEN is read per call. Passed as
arguments instead: `endpoint=` (HfApi, hf_hub_download, snapshot_download, hf_hub_url), `cache_dir=`/`local_dir=`
and `token=` (False: send none); get_hf_file_metadata takes the URL `hf_hub_url(..., endpoint=)` builds. The fake
never advertises Xet (no X-Xet-Hash, no xetHash), so downloads are plain HTTP whatever HF_HUB_DISABLE_XET says.

As on the Hub, a gated repo's info and tree are public and its files answer 401 (no token) or 403 (another token)
with X-Error-Code GatedRepo. A connection dropped mid-body is retried inside the same hf_hub_download call (after
1 s), resuming with Range from the last 10 MiB chunk written (constants.DOWNLOAD_CHUNK_SIZE): a smaller file is
fetched again whole; a failed call leaves no partial file to resume.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import struct
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from math import prod
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

import pytest

# Extensions stored with Git LFS by the Hub's default .gitattributes (the ones a model repo holds).
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".model")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(data: bytes) -> bytes:
    sha256 = hashlib.sha256(data).hexdigest()
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {len(data)}\n".encode()


def is_lfs(name: str) -> bool:
    return name.endswith(LFS_SUFFIXES)


def _commit_sha(files: dict[str, bytes], salt: str = "") -> str:
    listing = "".join(f"{name}\0{git_blob_sha1(data)}\n" for name, data in sorted(files.items()))
    return hashlib.sha1((salt + listing).encode()).hexdigest()


@dataclass
class FakeRepo:
    repo_id: str
    files: dict[str, bytes]
    revisions: dict[str, str] = field(default_factory=dict)
    gated: bool = False
    license: str | None = None
    drop_after: dict[str, int] = field(default_factory=dict)
    # Seconds a GET of the file waits before its body (a slow mirror), so a test can watch a download happen.
    delay: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.revisions:
            self.revisions = {"main": _commit_sha(self.files)}

    def resolve(self, revision: str) -> str | None:
        """The commit a ref name or full sha names, None when unknown."""
        if revision in self.revisions:
            return self.revisions[revision]
        return revision if revision in self.revisions.values() else None

    def blob_id(self, name: str) -> str:
        data = self.files[name]
        return git_blob_sha1(lfs_pointer(data) if is_lfs(name) else data)

    def sibling(self, name: str, blobs: bool) -> dict[str, Any]:
        if not blobs:
            return {"rfilename": name}
        entry: dict[str, Any] = {"rfilename": name, "size": len(self.files[name]), "blobId": self.blob_id(name)}
        if is_lfs(name):
            data = self.files[name]
            entry["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
                            "pointerSize": len(lfs_pointer(data))}
        return entry

    def tree_entry(self, name: str) -> dict[str, Any]:
        if name in self.files:
            entry = {"type": "file", "oid": self.blob_id(name), "size": len(self.files[name]), "path": name}
            if is_lfs(name):
                lfs = self.sibling(name, True)["lfs"]
                entry["lfs"] = {"oid": lfs["sha256"], "size": lfs["size"], "pointerSize": lfs["pointerSize"]}
            return entry
        below = {n: d for n, d in self.files.items() if n.startswith(name + "/")}
        return {"type": "directory", "oid": _commit_sha(below, salt=name), "size": 0, "path": name}

    def tree(self, path: str, recursive: bool) -> list[str] | None:
        """Paths listed under folder `path` ("" for the root), directories included; None when no such folder."""
        prefix = f"{path}/" if path else ""
        found: set[str] = set()
        for name in self.files:
            if not name.startswith(prefix):
                continue
            parts = name[len(prefix):].split("/")
            depth = len(parts) if recursive else 1
            found.update(prefix + "/".join(parts[:i]) for i in range(1, depth + 1))
        return sorted(found) if found else None

    def safetensors_info(self) -> dict[str, Any] | None:
        """Parameter counts per dtype, as the Hub reads them from the safetensors headers (None when unparsable)."""
        counts: dict[str, int] = {}
        try:
            for name, data in self.files.items():
                if name.endswith(".safetensors"):
                    (size,) = struct.unpack("<Q", data[:8])
                    header = json.loads(data[8:8 + size])
                    for key, tensor in header.items():
                        if key != "__metadata__":
                            counts[tensor["dtype"]] = counts.get(tensor["dtype"], 0) + prod(tensor["shape"])
        except (ValueError, KeyError, TypeError, AttributeError, struct.error):
            return None
        return {"parameters": counts, "total": sum(counts.values())} if counts else None

    def info(self, sha: str, blobs: bool) -> dict[str, Any]:
        tags = [f"license:{self.license}"] if self.license else []
        data: dict[str, Any] = {
            "_id": sha[:24], "id": self.repo_id, "modelId": self.repo_id, "author": self.repo_id.split("/")[0],
            "sha": sha, "lastModified": "2024-01-01T00:00:00.000Z", "createdAt": "2024-01-01T00:00:00.000Z",
            "private": False, "gated": "auto" if self.gated else False, "disabled": False, "downloads": 0,
            "likes": 0, "tags": tags, "siblings": [self.sibling(name, blobs) for name in sorted(self.files)],
            "usedStorage": sum(len(d) for d in self.files.values()),
        }
        if self.license:
            data["cardData"] = {"license": self.license}
        if (safetensors := self.safetensors_info()) is not None:
            data["safetensors"] = safetensors
        return data


def repo_from_dir(repo_id: str, folder: Path, **kwargs: Any) -> FakeRepo:
    files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    return FakeRepo(repo_id, files, **kwargs)


def pickle_only(repo: FakeRepo) -> FakeRepo:
    """A copy holding pytorch_model.bin instead of its safetensors weights (and index), on new commits."""
    files = {n: d for n, d in repo.files.items()
             if not n.endswith((".safetensors", ".safetensors.index.json"))}
    files["pytorch_model.bin"] = pickle.dumps({"weights": "not really"})
    revisions = {ref: _commit_sha(files, salt=sha) for ref, sha in repo.revisions.items()}
    drop_after = {n: k for n, k in repo.drop_after.items() if n in files}
    return replace(repo, files=files, revisions=revisions, drop_after=drop_after)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    hub: FakeHub


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_HEAD(self) -> None:
        self.server.hub._serve(self)

    def do_GET(self) -> None:
        self.server.hub._serve(self)

    def send(self, status: int, headers: dict[str, str], body: bytes = b"", sent: int | None = None) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body if sent is None else body[:sent])
        if sent is not None:
            self.close_connection = True

    def error(self, status: int, code: str | None, message: str, extra: dict[str, str] | None = None) -> None:
        headers = {"Content-Type": "application/json", "X-Error-Message": message, **(extra or {})}
        if code is not None:
            headers["X-Error-Code"] = code
        self.send(status, headers, json.dumps({"error": message}).encode())


class FakeHub:
    """Serves `repos` while entered; `token` is the one token with access to gated repos."""

    def __init__(self, repos: list[FakeRepo], token: str = "hf_test_token", tree_page_size: int = 1000) -> None:
        self.repos = {repo.repo_id: repo for repo in repos}
        self.token = token
        self.tree_page_size = tree_page_size
        self.ranges: list[tuple[str, str]] = []
        self._requests: list[tuple[str, str, str | None]] = []  # method, path with query, Range header
        self._dropped: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.hub = self
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="fake-hub",
                                        daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def requests(self) -> list[tuple[str, str]]:
        """(method, path with query) of every request served so far."""
        with self._lock:
            return [(method, path) for method, path, _ in self._requests]

    def downloads(self, repo_id: str, filename: str) -> int:
        """How many GETs of the file's resolve URL (any revision) read it to its end: a whole file, or the rest
        from an offset (`bytes=N-`, a resumed download); a bounded range (a safetensors header) is no download."""
        return sum(1 for spec in self._gets(repo_id, filename) if spec is None or spec.endswith("-"))

    def header_reads(self, repo_id: str, filename: str) -> list[str]:
        """The bounded ranges (`bytes=A-B`) of the file read: what a safetensors header read asks for."""
        return [spec for spec in self._gets(repo_id, filename) if spec is not None and not spec.endswith("-")]

    def _gets(self, repo_id: str, filename: str) -> list[str | None]:
        """The Range header (None without one) of each GET of the file's resolve URL, any revision."""
        prefix = f"/{repo_id}/resolve/"
        with self._lock:
            served = list(self._requests)
        return [spec for method, path, spec in served if method == "GET" and path.startswith(prefix)
                and unquote(urlsplit(path).path[len(prefix):].partition("/")[2]) == filename]

    def patch_env(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Point huggingface_hub here, online and without Xet, whether or not it is imported yet."""
        for key, value in {"HF_ENDPOINT": self.url, "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0"}.items():
            monkeypatch.setenv(key, value)
        constants = sys.modules.get("huggingface_hub.constants")
        if constants is not None:
            monkeypatch.setattr(constants, "ENDPOINT", self.url)
            monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                                self.url + "/{repo_id}/resolve/{revision}/{filename}")
            monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
            monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def _serve(self, request: _Handler) -> None:
        with self._lock:
            self._requests.append((request.command, request.path, request.headers.get("Range")))
        split = urlsplit(request.path)
        segments = split.path.lstrip("/").split("/")
        query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        if segments[:2] == ["api", "models"] and len(segments) >= 4:
            repo_id, rest = "/".join(segments[2:4]), segments[4:]
            if request.command == "GET" and not rest:
                return self._info(request, repo_id, "main", query)
            if request.command == "GET" and len(rest) == 2 and rest[0] == "revision":
                return self._info(request, repo_id, unquote(rest[1]), query)
            if request.command == "GET" and len(rest) >= 2 and rest[0] == "tree":
                return self._tree(request, repo_id, rest[1], unquote("/".join(rest[2:])), query)
        elif len(segments) >= 5 and segments[2] == "resolve":
            return self._resolve(request, "/".join(segments[:2]), unquote(segments[3]),
                                 unquote("/".join(segments[4:])))
        request.error(404, None, "Sorry, we can't find the page you are looking for.")

    def _repo(self, request: _Handler, repo_id: str, revision: str, gate: bool) -> tuple[FakeRepo, str] | None:
        authorization = request.headers.get("Authorization")
        repo = self.repos.get(repo_id)
        if repo is None:
            request.error(401 if authorization is None else 404, "RepoNotFound", "Repository not found")
            return None
        if gate and repo.gated and authorization != f"Bearer {self.token}":
            message = (f"Access to model {repo_id} is restricted. You must have access to it and be authenticated "
                       "to access it. Please log in." if authorization is None else
                       f"Access to model {repo_id} is restricted and you are not in the authorized list.")
            request.error(401 if authorization is None else 403, "GatedRepo", message)
            return None
        sha = repo.resolve(revision)
        if sha is None:
            request.error(404, "RevisionNotFound", "Invalid rev id: " + revision)
            return None
        return repo, sha

    def _info(self, request: _Handler, repo_id: str, revision: str, query: dict[str, str]) -> None:
        if (found := self._repo(request, repo_id, revision, gate=False)) is not None:
            repo, sha = found
            body = repo.info(sha, blobs=query.get("blobs", "").lower() in ("1", "true"))
            request.send(200, {"Content-Type": "application/json"}, json.dumps(body).encode())

    def _tree(self, request: _Handler, repo_id: str, quoted_rev: str, path: str, query: dict[str, str]) -> None:
        if (found := self._repo(request, repo_id, unquote(quoted_rev), gate=False)) is None:
            return
        repo, sha = found
        recursive = query.get("recursive", "").lower() in ("1", "true")
        names = repo.tree(path.strip("/"), recursive)
        if names is None:
            return request.error(404, "EntryNotFound", f"{path} does not exist on {sha}", {"X-Repo-Commit": sha})
        start = int(query.get("cursor", "0"))
        page = names[start:start + self.tree_page_size]
        headers = {"Content-Type": "application/json"}
        if start + self.tree_page_size < len(names):
            folder = f"/{quote(path, safe='')}" if path else ""
            params = urlencode({"recursive": query.get("recursive", "false"), "expand": query.get("expand", "false"),
                                "cursor": start + self.tree_page_size})
            headers["Link"] = f'<{self.url}/api/models/{repo_id}/tree/{quoted_rev}{folder}?{params}>; rel="next"'
        request.send(200, headers, json.dumps([repo.tree_entry(n) for n in page]).encode())

    def _resolve(self, request: _Handler, repo_id: str, revision: str, filename: str) -> None:
        if (found := self._repo(request, repo_id, revision, gate=True)) is None:
            return
        repo, sha = found
        if filename not in repo.files:
            return request.error(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": sha})
        data = repo.files[filename]
        headers = {"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes", "X-Repo-Commit": sha,
                   "ETag": f'"{repo.blob_id(filename)}"'}
        if is_lfs(filename):
            sha256 = hashlib.sha256(data).hexdigest()
            headers.update({"ETag": f'"{sha256}"', "X-Linked-Etag": f'"{sha256}"', "X-Linked-Size": str(len(data))})
        status, body = 200, data
        spec = request.headers.get("Range")
        if request.command == "GET" and spec:
            with self._lock:
                self.ranges.append((request.path, spec))
            start_s, _, end_s = spec.removeprefix("bytes=").partition("-")
            start = int(start_s) if start_s else max(len(data) - int(end_s), 0)
            end = min(int(end_s), len(data) - 1) if start_s and end_s else len(data) - 1
            if start >= len(data) or start > end:
                return request.error(416, None, "Range Not Satisfiable", {"Content-Range": f"bytes */{len(data)}"})
            status, body = 206, data[start:end + 1]
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        # A slow or dropped connection is a download's (what `downloads` counts), not a header read's.
        download = request.command == "GET" and (spec is None or spec.endswith("-"))
        if download and filename in repo.delay:
            time.sleep(repo.delay[filename])
        sent = None
        if download and filename in repo.drop_after:
            with self._lock:
                if (repo_id, filename) not in self._dropped:
                    self._dropped.add((repo_id, filename))
                    sent = repo.drop_after[filename]
        request.send(status, headers, body, sent=sent)
