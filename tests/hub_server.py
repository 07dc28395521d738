"""A minimal stand-in for the Hugging Face Hub on 127.0.0.1, for tests that publish and download models.

No maintained Hub-compatible server exists on PyPI (`olah` is a read-only mirror, `hf-local-hub` ships no server),
so this implements exactly the endpoints that `huggingface_hub` (2.x) calls for `create_repo`, `upload_folder` and
`hf_hub_download` / `from_pretrained`:

* `POST /api/repos/create`
* `POST /api/validate-yaml` (`upload_folder` sends README.md there first): only checks that the metadata block
  parses to a mapping; the Hub's own schema checks are not available offline.
* `POST /api/models/{repo}/preupload/{revision}`: every file is answered with `uploadMode: regular`, so its content
  comes inline (base64) in the commit instead of through LFS or Xet storage.
* `POST /api/models/{repo}/commit/{revision}`: an NDJSON body (header line, then `file` / `deletedFile` lines).
* `GET /api/models/{repo}[/revision/{revision}]` (repo info with its file list) and
  `GET /api/models/{repo}/tree/{revision}[/{path}]`.
* `HEAD` / `GET /{repo}/resolve/{revision}/{path}` with the headers `hf_hub_download` reads (`X-Repo-Commit`, `ETag`,
  `Content-Length`), and `X-Error-Code` on 404s so the client raises its usual not-found errors.

Only the latest commit of `main` is kept; files are stored under `root/{namespace}/{name}/`. Every request is
recorded in `requests` as (method, path) so tests can check what a client asked for.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import yaml

_METADATA_BLOCK = re.compile(r"\A---\s*\n(.*?)\n---\s*\n", re.DOTALL)
_REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
_ROUTES = [
    ("POST", re.compile(r"^/api/repos/create$"), "create_repo"),
    ("POST", re.compile(r"^/api/validate-yaml$"), "validate_yaml"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/preupload/(?P<revision>[^/]+)$"), "preupload"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/commit/(?P<revision>[^/]+)$"), "commit"),
    ("GET", re.compile(rf"^/api/models/{_REPO}(/revision/(?P<revision>[^/]+))?$"), "repo_info"),
    ("GET", re.compile(rf"^/api/models/{_REPO}/tree/(?P<revision>[^/]+)(/(?P<path>.*))?$"), "tree"),
    ("GET", re.compile(rf"^/{_REPO}/resolve/(?P<revision>[^/]+)/(?P<path>.+)$"), "resolve"),
    ("HEAD", re.compile(rf"^/{_REPO}/resolve/(?P<revision>[^/]+)/(?P<path>.+)$"), "resolve"),
]


@dataclass
class _Repo:
    folder: Path
    private: bool
    sha: str = "0" * 40
    create_request: dict = field(default_factory=dict)  # the body of the create request, e.g. what it said of privacy

    def files(self) -> dict[str, Path]:
        return {
            path.relative_to(self.folder).as_posix(): path for path in sorted(self.folder.rglob("*")) if path.is_file()
        }


@dataclass
class FakeHub:
    """The server's state; `url` is what `HF_ENDPOINT` / `HfApi(endpoint=...)` should point at."""

    root: Path
    url: str = ""
    repos: dict[str, _Repo] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def repo_files(self, repo_id: str) -> dict[str, bytes]:
        """The files of `repo_id` at its latest commit, by path."""
        return {name: path.read_bytes() for name, path in self.repos[repo_id].files().items()}


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub

    def log_message(self, format, *args):  # the test output stays quiet
        pass

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        path = unquote(urlsplit(self.path).path)
        with self.hub.lock:
            self.hub.requests.append((method, path))
        for route_method, pattern, handler_name in _ROUTES:
            match = pattern.match(path)
            if route_method == method and match:
                with self.hub.lock:
                    getattr(self, handler_name)(**{k: v for k, v in match.groupdict().items() if v is not None})
                return
        self._error(404, "EndpointNotFound", f"The fake Hub does not implement {method} {path}.")

    # Responses

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, payload, status: int = 200) -> None:
        self._send(status, json.dumps(payload).encode(), {"Content-Type": "application/json"})

    def _error(self, status: int, code: str, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        self._send(status, body, {"Content-Type": "application/json", "X-Error-Code": code, "X-Error-Message": message})

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def _repo(self, repo: str, revision: str | None = None) -> _Repo | None:
        found = self.hub.repos.get(repo)
        if found is None:
            self._error(404, "RepoNotFound", f"Repository {repo} not found.")
            return None
        if revision not in (None, "main", found.sha):
            self._error(404, "RevisionNotFound", f"Revision {revision} not found in {repo}.")
            return None
        return found

    # Endpoints

    def create_repo(self) -> None:
        request = json.loads(self._body())
        repo_id = f"{request['organization']}/{request['name']}" if request.get("organization") else request["name"]
        url = f"{self.hub.url}/{repo_id}"
        if repo_id in self.hub.repos:
            self._json({"error": "You already created this model repo", "url": url}, status=409)
            return
        folder = self.hub.root / repo_id
        folder.mkdir(parents=True)
        private = request.get("visibility") == "private" or bool(request.get("private"))
        self.hub.repos[repo_id] = _Repo(folder=folder, private=private, create_request=request)
        self._json({"url": url, "name": repo_id})

    def validate_yaml(self) -> None:
        match = _METADATA_BLOCK.match(json.loads(self._body())["content"])
        try:
            metadata = yaml.safe_load(match.group(1)) if match else None
        except yaml.YAMLError as error:
            metadata = error
        if not isinstance(metadata, dict):
            self._json({"errors": [{"message": f"README.md metadata is not a YAML mapping: {metadata}"}]}, status=400)
            return
        self._json({"errors": [], "warnings": []})

    def preupload(self, repo: str, revision: str) -> None:
        if self._repo(repo, revision) is None:
            return
        files = json.loads(self._body())["files"]
        self._json(
            {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in files]}
        )

    def commit(self, repo: str, revision: str) -> None:
        found = self._repo(repo, revision)
        if found is None:
            return
        body = self._body()
        for line in body.splitlines():
            item = json.loads(line)
            value = item["value"]
            if item["key"] == "file":
                target = found.folder / value["path"]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(base64.b64decode(value["content"]))
            elif item["key"] in ("deletedFile", "deletedFolder"):
                target = found.folder / value["path"]
                if target.is_file():
                    target.unlink()
            elif item["key"] != "header":
                self._error(400, "BadRequest", f"The fake Hub does not support commit lines of kind {item['key']!r}.")
                return
        found.sha = hashlib.sha1(found.sha.encode() + body).hexdigest()
        self._json({"commitUrl": f"{self.hub.url}/{repo}/commit/{found.sha}", "commitOid": found.sha})

    def repo_info(self, repo: str, revision: str | None = None) -> None:
        found = self._repo(repo, revision)
        if found is None:
            return
        siblings = [{"rfilename": name, "size": path.stat().st_size} for name, path in found.files().items()]
        self._json({"id": repo, "modelId": repo, "sha": found.sha, "private": found.private, "siblings": siblings})

    def tree(self, repo: str, revision: str, path: str = "") -> None:
        found = self._repo(repo, revision)
        if found is None:
            return
        prefix = f"{path.rstrip('/')}/" if path else ""
        entries = [
            {"type": "file", "path": name, "size": file.stat().st_size, "oid": _sha1(file.read_bytes())}
            for name, file in found.files().items()
            if name.startswith(prefix)
        ]
        self._json(entries)

    def resolve(self, repo: str, revision: str, path: str) -> None:
        found = self._repo(repo, revision)
        if found is None:
            return
        file = found.files().get(path)
        if file is None:
            self._error(404, "EntryNotFound", f"{path} does not exist in {repo} at {revision}.")
            return
        content = file.read_bytes()
        self._send(200, content, {"ETag": f'"{_sha1(content)}"', "X-Repo-Commit": found.sha})


def _sha1(content: bytes) -> str:
    return hashlib.sha1(content).hexdigest()


def start_fake_hub(root: Path) -> tuple[FakeHub, ThreadingHTTPServer]:
    """Serve a `FakeHub` storing its repos under `root` on a free port of 127.0.0.1, in a daemon thread.

    Stop it with `server.shutdown()`.
    """
    hub = FakeHub(root=Path(root))
    handler = type("FakeHubHandler", (_Handler,), {"hub": hub})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return hub, server
