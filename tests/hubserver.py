"""Minimal Hugging Face Hub-compatible HTTP server for tests (stdlib only, loopback only).

Layout served (model repos, ``org/name`` ids only)::

    root/<org>/<name>/refs.json            {"main": "<40-hex sha>", "v1": "<sha>", ...}
    root/<org>/<name>/<sha>/<files...>     full file tree of that commit

Endpoints (what huggingface_hub 1.33 calls):
    GET  /api/models/<org>/<name>[/revision/<rev>][?blobs=true]   model_info / repo_info
    GET  /api/models/<org>/<name>/tree/<rev>[/<path>]?recursive=   list_repo_tree / list_repo_files / snapshot
    HEAD|GET /<org>/<name>/resolve/<rev>/<file>                    hf_hub_download (Range supported)
    HEAD|GET /_lfs/<sha256>?repo=..&commit=..&file=..              LFS redirect target (redirect_lfs=True)

Test hooks on HubServer: ``counts`` (Counter "METHOD /path"), ``log`` [(method, path, auth)],
``ranges`` [(path, Range)], ``auth_headers`` [Authorization or None],
``cut(file, n1, n2, ...)`` (the next GETs of `file` send only n1, n2, ... body bytes, then drop
the connection), ``override[file] = bytes`` (serve other bytes than advertised).
"""

from __future__ import annotations

import collections
import hashlib
import json
import re
import threading
from fnmatch import fnmatch
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

LFS_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.gguf", "*.onnx", "*.h5", "*.msgpack")
SHA_RE = re.compile(r"^[0-9a-f]{40}$")


def create_repo(root, repo_id: str, commits: list[dict[str, bytes | str]], branch: str = "main") -> list[str]:
    """Write each commit (a full {path: content} snapshot) under root; point `branch` at the last one."""
    repo_dir, parent, shas = Path(root, repo_id), "", []
    for files in commits:
        h = hashlib.sha1(parent.encode())
        for path in sorted(files):
            data = files[path].encode() if isinstance(files[path], str) else files[path]
            h.update(path.encode() + b"\0" + hashlib.sha256(data).digest())
        sha = parent = h.hexdigest()
        for path, data in files.items():
            dest = repo_dir / sha / path
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data.encode() if isinstance(data, str) else data)
        shas.append(sha)
    refs_file = repo_dir / "refs.json"
    refs = json.loads(refs_file.read_text()) if refs_file.exists() else {}
    refs[branch] = shas[-1]
    refs_file.write_text(json.dumps(refs, indent=1))
    return shas


class HubError(Exception):
    def __init__(self, status: int, code: str | None, message: str, commit: str | None = None):
        super().__init__(message)
        self.status, self.code, self.commit = status, code, commit


class HubServer:
    def __init__(self, root, host="127.0.0.1", port=0, token=None, redirect_lfs=False, cdn_host=None):
        assert host.startswith("127.") or host == "localhost", "loopback only"
        self.root, self.token = Path(root), token
        self.redirect_lfs, self.cdn_host = redirect_lfs, cdn_host
        self.lock = threading.Lock()
        self.counts: collections.Counter = collections.Counter()
        self.ranges: list[tuple[str, str]] = []
        self.auth_headers: list[str | None] = []
        self.log: list[tuple[str, str, str | None]] = []  # (method, path, Authorization)
        self.override: dict[str, bytes] = {}  # filename -> bytes actually sent (metadata still from disk)
        self._cuts: dict[str, list[int]] = {}  # filename -> byte counts for the next GETs
        self._sha_cache: dict[tuple, str] = {}
        self.httpd = ThreadingHTTPServer((host, port), _make_handler(self))
        self.httpd.daemon_threads = True
        self.url = f"http://{host}:{self.httpd.server_address[1]}"
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> HubServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    __enter__ = start

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- hooks -------------------------------------------------------------------------------
    def cut(self, filename: str, *after_bytes: int) -> None:
        with self.lock:
            self._cuts[filename] = list(after_bytes)

    def reset_stats(self) -> None:
        with self.lock:
            self.counts.clear(), self.ranges.clear(), self.auth_headers.clear(), self.log.clear()

    def _take_cut(self, filename: str) -> int | None:
        with self.lock:
            pending = self._cuts.get(filename)
            return pending.pop(0) if pending else None

    # -- repository model --------------------------------------------------------------------
    def resolve(self, repo_id: str, rev: str) -> tuple[Path, str]:
        repo_dir = self.root / repo_id
        if ".." in repo_id.split("/") or not (repo_dir / "refs.json").is_file():
            raise HubError(404, "RepoNotFound", f"Repository {repo_id} not found")
        refs = json.loads((repo_dir / "refs.json").read_text())
        sha = refs.get(rev) or (rev if SHA_RE.match(rev) else None)
        if sha is None or not (repo_dir / sha).is_dir():
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return repo_dir / sha, sha

    def sha256(self, path: Path) -> str:
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        if key not in self._sha_cache:
            self._sha_cache[key] = hashlib.sha256(path.read_bytes()).hexdigest()
        return self._sha_cache[key]

    def file_info(self, snap: Path, rel: str) -> dict:
        p = snap / rel
        size = p.stat().st_size
        lfs = any(fnmatch(rel.rsplit("/", 1)[-1], pat) for pat in LFS_PATTERNS)
        if not lfs:
            oid = hashlib.sha1(b"blob %d\0" % size + p.read_bytes()).hexdigest()
            return {"type": "file", "path": rel, "size": size, "oid": oid}
        sha = self.sha256(p)
        pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {size}\n".encode()
        oid = hashlib.sha1(b"blob %d\0" % len(pointer) + pointer).hexdigest()
        return {
            "type": "file",
            "path": rel,
            "size": size,
            "oid": oid,
            "lfs": {"oid": sha, "size": size, "pointerSize": len(pointer)},
        }

    def files(self, snap: Path) -> list[str]:
        return sorted(p.relative_to(snap).as_posix() for p in snap.rglob("*") if p.is_file())

    def model_info(self, repo_id: str, rev: str, blobs: bool) -> dict:
        snap, sha = self.resolve(repo_id, rev)
        siblings = []
        for rel in self.files(snap):
            if not blobs:
                siblings.append({"rfilename": rel})
                continue
            info = self.file_info(snap, rel)
            sib = {"rfilename": rel, "size": info["size"], "blobId": info["oid"]}
            if "lfs" in info:
                sib["lfs"] = {
                    "sha256": info["lfs"]["oid"],
                    "size": info["size"],
                    "pointerSize": info["lfs"]["pointerSize"],
                }
            siblings.append(sib)
        return {
            "_id": sha[:24],
            "id": repo_id,
            "modelId": repo_id,
            "author": repo_id.split("/")[0],
            "sha": sha,
            "private": False,
            "gated": False,
            "disabled": False,
            "tags": [],
            "siblings": siblings,
            "lastModified": "2024-01-01T00:00:00.000Z",
            "createdAt": "2024-01-01T00:00:00.000Z",
        }

    def tree(self, repo_id: str, rev: str, path: str, recursive: bool) -> list[dict]:
        snap, _ = self.resolve(repo_id, rev)
        base = snap / path if path else snap
        if not base.is_dir():
            raise HubError(404, "EntryNotFound", f"{path} does not exist on {rev}")
        out = []
        for p in sorted(base.rglob("*") if recursive else base.iterdir()):
            rel = p.relative_to(snap).as_posix()
            out.append(
                self.file_info(snap, rel)
                if p.is_file()
                else {"type": "directory", "path": rel, "size": 0, "oid": hashlib.sha1(rel.encode()).hexdigest()}
            )
        return out


def _make_handler(hub: HubServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep test output quiet
            pass

        def do_HEAD(self):
            self._dispatch(head=True)

        def do_GET(self):
            self._dispatch(head=False)

        def _send(self, status: int, headers: dict, body: bytes = b"", head: bool = False) -> None:
            self.send_response(status)
            for k, v in {"Content-Length": str(len(body)), **headers}.items():
                self.send_header(k, v)
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _json(self, obj, head: bool) -> None:
            self._send(200, {"Content-Type": "application/json"}, json.dumps(obj).encode(), head)

        def _dispatch(self, head: bool) -> None:
            url = urlsplit(self.path)
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            parts = [unquote(s) for s in url.path.strip("/").split("/")]
            with hub.lock:
                hub.counts[f"{self.command} {url.path}"] += 1
                hub.auth_headers.append(self.headers.get("Authorization"))
                hub.log.append((self.command, url.path, self.headers.get("Authorization")))
                if self.headers.get("Range"):
                    hub.ranges.append((url.path, self.headers["Range"]))
            try:
                if hub.token and self.headers.get("Authorization") != f"Bearer {hub.token}":
                    raise HubError(401, "RepoNotFound", "Invalid username or password.")
                # Dataset repos live under root/datasets/<org>/<name> and answer on /api/datasets/
                # and /datasets/<org>/<name>/resolve/...; model repos under root/<org>/<name>.
                kind = ""
                if parts[:2] == ["api", "datasets"]:
                    parts, kind = ["api", "models", *parts[2:]], "datasets/"
                elif parts[0] == "datasets":
                    parts, kind = parts[1:], "datasets/"
                if parts[:2] == ["api", "models"] and len(parts) >= 4:
                    repo_id, rest = kind + "/".join(parts[2:4]), parts[4:]
                    if not rest:
                        return self._json(hub.model_info(repo_id, "main", query.get("blobs") == "true"), head)
                    if rest[0] == "revision" and len(rest) == 2:
                        return self._json(hub.model_info(repo_id, rest[1], query.get("blobs") == "true"), head)
                    if rest[0] == "tree" and len(rest) >= 2:
                        recursive = query.get("recursive", "false").lower() in ("true", "1")
                        return self._json(hub.tree(repo_id, rest[1], "/".join(rest[2:]), recursive), head)
                elif parts[0] == "_lfs" and len(parts) == 2:
                    snap, sha = hub.resolve(query["repo"], query["commit"])
                    return self._file(snap, sha, query["file"], head, allow_redirect=False)
                elif len(parts) >= 5 and parts[2] == "resolve":
                    snap, sha = hub.resolve(kind + "/".join(parts[:2]), parts[3])
                    return self._file(
                        snap, sha, "/".join(parts[4:]), head, allow_redirect=True, repo_id="/".join(parts[:2])
                    )
                raise HubError(404, None, "Not Found")
            except HubError as e:
                hdrs = {"Content-Type": "application/json", "X-Error-Message": str(e)}
                if e.code:
                    hdrs["X-Error-Code"] = e.code
                if e.commit:
                    hdrs["X-Repo-Commit"] = e.commit
                self._send(e.status, hdrs, json.dumps({"error": str(e)}).encode(), head)

        def _file(self, snap: Path, sha: str, rel: str, head: bool, allow_redirect: bool, repo_id: str = "") -> None:
            path = snap / rel
            if not path.is_file() or not path.resolve().is_relative_to(snap.resolve()):
                raise HubError(404, "EntryNotFound", f"{rel} does not exist on {sha}", commit=sha)
            info = hub.file_info(snap, rel)
            etag = f'"{info["lfs"]["oid"] if "lfs" in info else info["oid"]}"'
            base = {"X-Repo-Commit": sha, "ETag": etag, "Accept-Ranges": "bytes"}
            if allow_redirect and hub.redirect_lfs and "lfs" in info:
                host = hub.cdn_host or self.server.server_address[0]
                loc = (
                    f"http://{host}:{self.server.server_address[1]}/_lfs/{info['lfs']['oid']}"
                    f"?repo={quote(repo_id, safe='')}&commit={sha}&file={quote(rel, safe='')}"
                )
                return self._send(
                    302, {**base, "Location": loc, "X-Linked-Etag": etag, "X-Linked-Size": str(info["size"])}, b"", head
                )
            data = path.read_bytes() if head else hub.override.get(rel) or path.read_bytes()
            total, start, end, status = len(data), 0, len(data) - 1, 200
            m = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", ""))
            if m and (m.group(1) or m.group(2)):
                if m.group(1):
                    start, end = int(m.group(1)), min(int(m.group(2) or total - 1), total - 1)
                else:  # suffix range: last N bytes
                    start = max(total - int(m.group(2)), 0)
                if start >= total or start > end:
                    return self._send(416, {**base, "Content-Range": f"bytes */{total}"}, b"", head)
                status = 206
                base["Content-Range"] = f"bytes {start}-{end}/{total}"
            body = data[start : end + 1]
            cut_at = None if head else hub._take_cut(rel)
            if cut_at is None:
                return self._send(status, base, body, head)
            # Simulated network failure: promise the whole body, send a prefix, drop the connection.
            self.send_response(status)
            for k, v in {"Content-Length": str(len(body)), **base}.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body[:cut_at])
            self.wfile.flush()
            self.close_connection = True

    return Handler


if __name__ == "__main__":  # python hubserver.py ROOT [PORT]
    import sys

    srv = HubServer(sys.argv[1], port=int(sys.argv[2]) if len(sys.argv) > 2 else 0)
    print(f"serving {sys.argv[1]} at {srv.url}", flush=True)
    srv.httpd.serve_forever()
