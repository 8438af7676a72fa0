"""A small Hub-compatible HTTP server on loopback, answering the endpoints huggingface_hub uses to create repos,
commit files, describe revisions and serve files. Commits are atomic: files become visible only when the whole
commit request has been read. `fail_next(fragment)` makes the next request whose path contains `fragment` fail
with HTTP 500 (to test interrupted pushes)."""

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


def _git_sha1(data: bytes) -> str:
    return hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()


class HubState:
    def __init__(self):
        self.repos: dict[str, dict] = {}  # repo -> {"branches": {name: sha}, "commits": {sha: {path: bytes}}}
        self.failures: list[str] = []
        self.requests: list[str] = []
        self.lock = threading.Lock()

    def fail_next(self, fragment: str) -> None:
        self.failures.append(fragment)

    def files(self, repo: str, revision: str) -> tuple[str, dict[str, bytes]] | None:
        entry = self.repos.get(repo)
        if entry is None:
            return None
        sha = entry["branches"].get(revision, revision if revision in entry["commits"] else None)
        if sha is None:
            return None
        return sha, entry["commits"][sha]


class HubHandler(BaseHTTPRequestHandler):
    state: HubState

    def log_message(self, *args):  # keep test output clean
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, content_type="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, value) -> None:
        self._send(status, json.dumps(value).encode())

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _should_fail(self) -> bool:
        with self.state.lock:
            self.state.requests.append(f"{self.command} {self.path}")
            for fragment in self.state.failures:
                if fragment in self.path:
                    self.state.failures.remove(fragment)
                    return True
        return False

    def _route(self):
        if self._should_fail():
            self._body()
            return self._json(500, {"error": "injected failure"})
        path = unquote(urlparse(self.path).path)
        parts = path.strip("/").split("/")
        state = self.state
        if self.command == "POST" and path == "/api/repos/create":
            request = json.loads(self._body() or b"{}")
            repo = f"{request.get('organization') or 'user'}/{request['name']}"
            with state.lock:
                existed = repo in state.repos
                if not existed:
                    state.repos[repo] = {"branches": {"main": "0" * 40}, "commits": {"0" * 40: {}}}
            if existed:
                return self._json(409, {"error": "You already created this model repo", "url": f"/{repo}"})
            return self._json(200, {"url": f"http://{self.headers['Host']}/{repo}", "name": repo})
        if self.command == "POST" and path == "/api/validate-yaml":
            self._body()
            return self._json(200, {"warnings": []})
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("preupload", "commit"):
            repo, action, revision = f"{parts[2]}/{parts[3]}", parts[4], "/".join(parts[5:])
            body = self._body()
            if repo not in state.repos:
                return self._json(404, {"error": "Repository not found"})
            if action == "preupload":
                files = json.loads(body)["files"]
                return self._json(
                    200,
                    {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]},
                )
            current = state.files(repo, revision)
            files = dict(current[1]) if current else {}
            for line in body.splitlines():
                entry = json.loads(line)
                if entry["key"] == "file":
                    files[entry["value"]["path"]] = base64.b64decode(entry["value"]["content"])
                elif entry["key"] == "deletedFile":
                    files.pop(entry["value"]["path"], None)
            sha = hashlib.sha1(json.dumps(sorted((k, _git_sha1(v)) for k, v in files.items())).encode()).hexdigest()
            with state.lock:  # the new revision appears in one step
                state.repos[repo]["commits"][sha] = files
                state.repos[repo]["branches"][revision] = sha
            return self._json(
                200, {"commitUrl": f"http://{self.headers['Host']}/{repo}/commit/{sha}", "commitOid": sha}
            )
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "branch":
            repo, branch = f"{parts[2]}/{parts[3]}", "/".join(parts[5:])
            self._body()
            with state.lock:
                entry = state.repos[repo]
                entry["branches"].setdefault(branch, entry["branches"]["main"])
            return self._json(200, {})
        if parts[:2] == ["api", "models"] and (
            len(parts) == 4 or (len(parts) >= 6 and parts[4] in ("revision", "tree"))
        ):
            if len(parts) == 4:  # GET /api/models/{repo}: the main revision
                parts = [*parts, "revision", "main"]
            repo, revision = f"{parts[2]}/{parts[3]}", parts[5]
            found = state.files(repo, revision)
            if found is None:
                return (
                    self._json(404, {"error": "Repository not found"})
                    if repo not in state.repos
                    else self._send(404, b'{"error": "Revision not found"}', {"X-Error-Code": "RevisionNotFound"})
                )
            sha, files = found
            if parts[4] == "tree":
                return self._json(
                    200,
                    [
                        {"type": "file", "path": name, "size": len(data), "oid": _git_sha1(data)}
                        for name, data in sorted(files.items())
                    ],
                )
            siblings = [
                {"rfilename": name, "size": len(data), "blobId": _git_sha1(data)} for name, data in files.items()
            ]
            return self._json(
                200,
                {
                    "id": repo,
                    "modelId": repo,
                    "sha": sha,
                    "siblings": siblings,
                    "private": False,
                    "tags": [],
                    "downloads": 0,
                    "likes": 0,
                },
            )
        if len(parts) >= 5 and parts[2] == "resolve":
            repo, revision, name = f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:])
            found = state.files(repo, revision)
            if found is None or name not in found[1]:
                return self._send(404, b'{"error": "Entry not found"}', {"X-Error-Code": "EntryNotFound"})
            sha, files = found
            data = files[name]
            headers = {"X-Repo-Commit": sha, "ETag": f'"{_git_sha1(data)}"'}
            return self._send(200, data, headers, content_type="application/octet-stream")
        self._body()
        return self._json(404, {"error": f"unknown endpoint {self.command} {path}"})

    do_GET = do_POST = do_HEAD = do_PUT = _route


def start_hub_server() -> tuple[ThreadingHTTPServer, HubState, str]:
    """Start the server on 127.0.0.1 (a free port) in a daemon thread; returns (server, state, endpoint)."""
    state = HubState()
    handler = type("BoundHubHandler", (HubHandler,), {"state": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, state, f"http://127.0.0.1:{server.server_address[1]}"
