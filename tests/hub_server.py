"""A small Hugging Face Hub for tests: the Hub HTTP API on 127.0.0.1, standard library only, state in memory.

The real ``huggingface_hub`` client (and transformers on top of it) talks to it when ``HF_ENDPOINT`` points at
it, ``HF_HUB_DISABLE_XET=1`` and ``HF_HUB_OFFLINE`` is unset. It implements what publishing and loading a
checkpoint use, with the Hub's status codes and ``X-Error-Code`` headers, so the client raises its usual
exceptions:

- accounts: ``GET /api/whoami-v2`` (Bearer tokens; 401 without a valid one);
- repositories: ``POST /api/repos/create`` (409 if it exists), ``DELETE /api/repos/delete``,
  ``GET /api/models/{repo}[/revision/{rev}]`` (repo info with ``siblings`` and ``sha``), private repositories
  (invisible to other users: 401/404 ``RepoNotFound``);
- commits: ``POST /api/models/{repo}/preupload/{rev}`` (regular vs LFS: ``*.safetensors`` and other binaries,
  or files >= 10 MB, go through LFS), the LFS batch API ``POST /{repo}.git/info/lfs/objects/batch`` with basic
  single-part PUT transfers and verify (objects are stored per repository; one it has is not asked for again),
  ``POST /api/models/{repo}/commit/{rev}`` (NDJSON: header, base64
  files, LFS pointers, deletions; ``parentCommit``; ``create_pr``), ``POST /api/validate-yaml``;
- refs: ``POST /api/models/{repo}/branch/{branch}`` (409 if it exists), ``GET .../refs``, ``GET .../commits/{rev}``;
- files: ``GET .../tree/{rev}[/{path}]``, ``POST .../paths-info/{rev}``, ``HEAD``/``GET /{repo}/resolve/{rev}/{path}``
  with ``ETag``, ``X-Repo-Commit`` and ``Content-Length`` (revisions are branches, ``refs/pr/N`` or commit ids).

Failures are injected with :meth:`LocalHub.fail`, for the next N requests matching a method and path (or all of
them, until :meth:`LocalHub.clear_failures`): an HTTP status, a dropped connection, or the server going away in the
middle of the request (it stops listening until :meth:`LocalHub.start` is called again, on the same port). This
covers every phase of a commit: preupload, the LFS batch API, the LFS ``PUT`` uploads and their verification, and
the commit itself. Every request is recorded in :attr:`LocalHub.requests` with its
status and user, so tests can check what the client did (and that nothing was uploaded). The server runs in a
thread of the test process: it imports nothing from ``huggingface_hub``, so ``HF_ENDPOINT`` can still be set
for the client processes that the tests start.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

# The .gitattributes the Hub puts in every new model repository (abridged): these patterns are stored with LFS.
LFS_PATTERNS = (
    "*.7z *.arrow *.bin *.bz2 *.ckpt *.ftz *.gz *.h5 *.joblib *.lfs *.mlmodel *.model *.msgpack *.npy *.npz *.onnx "
    "*.ot *.parquet *.pb *.pickle *.pkl *.pt *.pth *.rar *.safetensors *.tar *.tflite *.tgz *.wasm *.xz *.zip *.zst"
).split()
GITATTRIBUTES = "".join(f"{pattern} filter=lfs diff=lfs merge=lfs -text\n" for pattern in LFS_PATTERNS)
LFS_THRESHOLD = 10 * 1024 * 1024  # larger files go through LFS whatever their name

REPO = r"(?P<repo>[^/?]+/[^/?]+)"
SEGMENT = r"[^/?]+"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Blob:
    """A file's content and how the Hub stores it (inline in git, or in LFS behind a pointer)."""

    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def pointer(self) -> bytes:
        return f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {len(self.data)}\n".encode()

    @property
    def git_oid(self) -> str:
        """The git blob id: of the content itself, or of the LFS pointer for LFS files (as on the Hub)."""
        stored = self.pointer if self.lfs else self.data
        return hashlib.sha1(b"blob %d\0" % len(stored) + stored).hexdigest()

    @property
    def etag(self) -> str:
        """What ``resolve`` returns as ETag: the git blob id, or the sha256 for LFS files (the Hub's X-Linked-Etag)."""
        return self.sha256 if self.lfs else self.git_oid

    def tree_entry(self, path: str) -> dict:
        entry = {"type": "file", "oid": self.git_oid, "size": len(self.data), "path": path}
        if self.lfs:
            entry["lfs"] = {"oid": self.sha256, "size": len(self.data), "pointerSize": len(self.pointer)}
        return entry


@dataclass
class Commit:
    oid: str
    parent: str | None
    files: dict[str, Blob]
    title: str
    message: str
    author: str
    date: str = field(default_factory=_now)


@dataclass
class Repo:
    repo_id: str
    owner: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)  # branch name or "refs/pr/N" -> commit oid
    created_at: str = field(default_factory=_now)
    num_prs: int = 0

    def resolve(self, revision: str) -> Commit | None:
        """A branch, ``refs/heads/<branch>``, ``refs/pr/N``, or a commit id (full, or a prefix of 7+ characters)."""
        revision = revision.removeprefix("refs/heads/")
        if revision in self.refs:
            return self.commits[self.refs[revision]]
        if re.fullmatch(r"[0-9a-f]{7,40}", revision):
            found = [commit for oid, commit in self.commits.items() if oid.startswith(revision)]
            return found[0] if len(found) == 1 else None
        return None

    def history(self, commit: Commit) -> list[Commit]:
        chain = [commit]
        while chain[-1].parent is not None:
            chain.append(self.commits[chain[-1].parent])
        return chain


class HubError(Exception):
    """An HTTP error answer: status, message, and the Hub's X-Error-Code when the client keys on one."""

    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


DOWN = "down"  # a Failure status: the server goes away in the middle of the request


@dataclass
class Failure:
    method: str
    pattern: re.Pattern
    status: int | str | None  # an HTTP status; None: drop the connection without answering; DOWN: the server dies
    remaining: int | None  # None: every matching request until clear_failures()


class LocalHub:
    """The Hub's state and its HTTP server on 127.0.0.1 (a random free port).

    Args:
        tokens: access token -> user name. Requests with another token get 401, as on the Hub.

    Use as a context manager, or call :meth:`start` and :meth:`stop`. :attr:`url` is the value for ``HF_ENDPOINT``.
    """

    def __init__(self, tokens: dict[str, str] | None = None):
        self.tokens = dict(tokens or {"hf_local_test_token": "user"})
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[tuple[str, str], bytes] = {}  # (repo id, sha256) -> content of an uploaded LFS object
        # [method, path, status, user] of every request: status None for a dropped connection, user None without a
        # token and "<invalid>" for an unknown one.
        self.requests: list[list] = []
        self.failures: list[Failure] = []
        self._lock = threading.RLock()
        self._counter = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._address: tuple[str, int] | None = None  # kept across stop(): start() again listens on the same port
        self.down = False  # set by a DOWN failure: every request is dropped until start()

    # -- lifecycle ---------------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self._address is None:
            raise RuntimeError("the local Hub was never started")
        host, port = self._address
        return f"http://{host}:{port}"

    @property
    def running(self) -> bool:
        return self._server is not None and not self.down

    def start(self) -> LocalHub:
        """Listen (again): on a free port the first time, on the same port after :meth:`stop` or a DOWN failure."""
        if self._server is not None:
            self.stop()
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(self._address or ("127.0.0.1", 0), Handler)
        self._address = self._server.server_address[:2]
        self.down = False
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="local-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- test controls -------------------------------------------------------------------------------------------

    def fail(self, method: str, path_regex: str, status: int | str | None = 500, times: int | None = 1) -> None:
        """Make the next ``times`` requests (``None``: all of them, until :meth:`clear_failures`) whose method is
        ``method`` and whose path matches ``path_regex`` (``re.search``) fail:

        - ``status`` an int: answer it, with a JSON error body;
        - ``status=None``: read the request, then close the connection without answering (a dropped request);
        - ``status=DOWN``: read half of the request body, close the connection and stop listening: the server is
          gone (connections are refused, and requests on open connections are dropped) until :meth:`start`.
        """
        if not (status is None or status == DOWN or isinstance(status, int)):
            raise ValueError(f"status must be an HTTP status, None or {DOWN!r}, got {status!r}")
        with self._lock:
            self.failures.append(Failure(method.upper(), re.compile(path_regex), status, times))

    def clear_failures(self) -> None:
        with self._lock:
            self.failures.clear()

    def clear_requests(self) -> None:
        with self._lock:
            self.requests.clear()

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The files of a repository at a revision (for assertions)."""
        commit = self.repos[repo_id].resolve(revision)
        if commit is None:
            raise KeyError(f"{repo_id}@{revision}")
        return {path: blob.data for path, blob in commit.files.items()}

    # -- helpers used by the handler ---------------------------------------------------------------------------

    def _new_oid(self, *parts: str) -> str:
        with self._lock:
            self._counter += 1
            return hashlib.sha1("\0".join((*parts, str(self._counter), str(time.time_ns()))).encode()).hexdigest()

    def _take_failure(self, method: str, path: str) -> Failure | None:
        with self._lock:
            for failure in self.failures:
                if failure.remaining == 0 or failure.method != method or not failure.pattern.search(path):
                    continue
                if failure.remaining is not None:
                    failure.remaining -= 1
                return failure
        return None

    def _go_down(self) -> None:
        """Stop listening (called from a request's thread), keeping the state and the port for :meth:`start`."""
        with self._lock:
            server, thread, self._server, self._thread = self._server, self._thread, None, None
        if server is not None:
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)


class _Handler(BaseHTTPRequestHandler):
    """Routes requests to the Hub endpoints; errors become the Hub's JSON error answers."""

    hub: LocalHub
    protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects; every answer has a length

    # (method, regex on the raw path) -> handler name. Path segments stay URL-quoted until matched, so that
    # revisions like "refs%2Fpr%2F1" are one segment.
    ROUTES: list[tuple[str, re.Pattern, str]] = [
        (m, re.compile(rf"^{p}$"), h)
        for m, p, h in [
            ("GET", r"/api/whoami-v2", "whoami"),
            ("POST", r"/api/repos/create", "create_repo"),
            ("DELETE", r"/api/repos/delete", "delete_repo"),
            ("POST", r"/api/validate-yaml", "validate_yaml"),
            ("GET", rf"/api/models/{REPO}", "repo_info"),
            ("GET", rf"/api/models/{REPO}/revision/(?P<rev>{SEGMENT})", "repo_info"),
            ("GET", rf"/api/models/{REPO}/refs", "refs"),
            ("GET", rf"/api/models/{REPO}/commits/(?P<rev>{SEGMENT})", "commits"),
            ("GET", rf"/api/models/{REPO}/tree/(?P<rev>{SEGMENT})(?:/(?P<path>.*))?", "tree"),
            ("POST", rf"/api/models/{REPO}/paths-info/(?P<rev>{SEGMENT})", "paths_info"),
            ("POST", rf"/api/models/{REPO}/preupload/(?P<rev>{SEGMENT})", "preupload"),
            ("POST", rf"/api/models/{REPO}/commit/(?P<rev>{SEGMENT})", "commit"),
            ("POST", rf"/api/models/{REPO}/branch/(?P<branch>.+)", "create_branch"),
            ("POST", rf"/{REPO}\.git/info/lfs/objects/batch", "lfs_batch"),
            ("PUT", rf"/{REPO}/lfs-upload/(?P<oid>[0-9a-f]{{64}})", "lfs_upload"),
            ("POST", rf"/{REPO}/lfs-verify", "lfs_verify"),
            ("GET", rf"/{REPO}/resolve/(?P<rev>{SEGMENT})/(?P<path>.+)", "resolve"),
            ("HEAD", rf"/{REPO}/resolve/(?P<rev>{SEGMENT})/(?P<path>.+)", "resolve"),
        ]
    ]

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's signature
        pass  # quiet: requests are recorded in hub.requests

    # -- plumbing ------------------------------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        record = [method, url.path, None, self._auth_label()]
        self.hub.requests.append(record)  # list.append is atomic; the status is filled in below
        if self.hub.down:  # the server is gone: a request on a connection that was still open gets no answer
            self._drop()
            return
        failure = self.hub._take_failure(method, url.path)
        if failure is not None and failure.status == DOWN:
            self.rfile.read(int(self.headers.get("Content-Length") or 0) // 2)  # it dies in the middle of the body
            self.hub.down = True
            self._drop()
            threading.Thread(target=self.hub._go_down, name="local-hub-down", daemon=True).start()
            return
        body = self._read_body()
        if failure is not None and failure.status is None:
            self._drop()  # no answer at all: the client sees the connection drop
            return
        try:
            if failure is not None:
                raise HubError(failure.status, f"Injected failure ({failure.status}) for {method} {url.path}")
            for route_method, pattern, name in self.ROUTES:
                match = pattern.match(url.path)
                if route_method == method and match:
                    params = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                    status, headers, payload = getattr(self, f"api_{name}")(body=body, **params)
                    break
            else:
                raise HubError(404, f"No route for {method} {url.path} in the local Hub", "RouteNotFound")
        except HubError as error:
            status, payload = error.status, json.dumps({"error": error.message}).encode()
            headers = {"Content-Type": "application/json", "X-Error-Message": error.message}
            if error.code:
                headers["X-Error-Code"] = error.code
        record[2] = status
        self.send_response(status)
        if isinstance(payload, (dict, list)):
            payload = json.dumps(payload).encode()
            headers.setdefault("Content-Type", "application/json")
        headers.setdefault("Content-Length", str(len(payload)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(payload)

    def _drop(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _json(self, body: bytes) -> dict:
        try:
            return json.loads(body or b"{}")
        except json.JSONDecodeError as error:
            raise HubError(400, f"Invalid JSON body: {error}") from None

    # -- authentication ----------------------------------------------------------------------------------------

    def _auth_label(self) -> str | None:
        token = self.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        return None if not token else self.hub.tokens.get(token, "<invalid>")

    def _user(self) -> str | None:
        """The authenticated user; a token that is present but unknown is a 401, as on the Hub."""
        auth = self.headers.get("Authorization", "")
        if not auth:
            return None
        token = auth.removeprefix("Bearer ").strip()
        user = self.hub.tokens.get(token)
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return user

    def _repo(self, repo_id: str, *, write: bool = False) -> Repo:
        user = self._user()
        repo = self.hub.repos.get(repo_id)
        if repo is None or (repo.private and user != repo.owner):
            # The Hub does not reveal that a private repository exists.
            raise HubError(401 if user is None else 404, "Repository not found", "RepoNotFound")
        if write:
            if user is None:
                raise HubError(401, "You must be authenticated to write to this repository")
            if user != repo.owner:
                raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    def _commit(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    # -- endpoints: each returns (status, headers, payload) ---------------------------------------------------

    def api_whoami(self, body: bytes):
        user = self._user()
        if user is None:
            raise HubError(401, "Invalid username or password.")
        auth = {"type": "access_token", "accessToken": {"displayName": "local-test", "role": "write"}}
        return 200, {}, {"type": "user", "id": user, "name": user, "fullname": user, "orgs": [], "auth": auth}

    def api_create_repo(self, body: bytes):
        user = self._user()
        if user is None:
            raise HubError(401, "You must be authenticated to create a repository")
        payload = self._json(body)
        if payload.get("type") not in (None, "model"):
            raise HubError(400, "The local Hub serves model repositories only")
        namespace = payload.get("organization") or user
        if namespace != user:
            raise HubError(403, f"You don't have the rights to create a repository under {namespace}")
        name = payload.get("name") or ""
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}", name):
            raise HubError(400, f"Invalid repository name: {name!r}")
        repo_id = f"{namespace}/{name}"
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        with self.hub._lock:
            if repo_id in self.hub.repos:
                raise HubError(409, "You already created this model repo")
            repo = Repo(repo_id, owner=user, private=private)
            first = Commit(
                self.hub._new_oid(repo_id),
                None,
                {".gitattributes": Blob(GITATTRIBUTES.encode(), lfs=False)},
                "initial commit",
                "",
                user,
            )
            repo.commits[first.oid], repo.refs["main"] = first, first.oid
            self.hub.repos[repo_id] = repo
        return 200, {}, {"url": f"{self.hub.url}/{repo_id}", "name": repo_id, "id": first.oid}

    def api_delete_repo(self, body: bytes):
        payload = self._json(body)
        repo_id = f"{payload.get('organization') or self._user()}/{payload.get('name')}"
        self._repo(repo_id, write=True)
        with self.hub._lock:
            del self.hub.repos[repo_id]
        return 200, {}, b""

    def api_validate_yaml(self, body: bytes):
        content = self._json(body).get("content", "")
        if content.startswith("---") and content.count("\n---") < 1:
            raise HubError(400, "README.md metadata block is not closed")
        return 200, {}, {"errors": [], "warnings": []}

    def api_repo_info(self, body: bytes, repo: str, rev: str = "main"):
        found = self._repo(repo)
        commit = self._commit(found, rev)
        return (
            200,
            {},
            {
                "_id": found.repo_id,
                "id": found.repo_id,
                "modelId": found.repo_id,
                "author": found.owner,
                "sha": commit.oid,
                "lastModified": commit.date,
                "createdAt": found.created_at,
                "private": found.private,
                "gated": False,
                "disabled": False,
                "tags": [],
                "siblings": [{"rfilename": path} for path in sorted(commit.files)],
            },
        )

    def api_refs(self, body: bytes, repo: str):
        found = self._repo(repo)
        branches = [
            {"name": name, "ref": f"refs/heads/{name}", "targetCommit": oid}
            for name, oid in found.refs.items()
            if not name.startswith("refs/")
        ]
        prs = [{"name": name, "ref": name, "targetCommit": oid} for name, oid in found.refs.items() if "/pr/" in name]
        payload = {"branches": branches, "converts": [], "tags": []}
        if self.query.get("include_prs"):
            payload["pullRequests"] = prs
        return 200, {}, payload

    def api_commits(self, body: bytes, repo: str, rev: str):
        found = self._repo(repo)
        return (
            200,
            {},
            [
                {
                    "id": commit.oid,
                    "authors": [{"user": commit.author}],
                    "date": commit.date,
                    "title": commit.title,
                    "message": commit.message,
                }
                for commit in found.history(self._commit(found, rev))
            ],
        )

    def api_tree(self, body: bytes, repo: str, rev: str, path: str = ""):
        found = self._repo(repo)
        commit = self._commit(found, rev)
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        if prefix and not any(name.startswith(prefix) for name in commit.files):
            raise HubError(404, f"{path} does not exist on {rev}", "EntryNotFound")
        recursive = self.query.get("recursive", "false").lower() in ("1", "true")
        entries, folders = [], set()
        for name in sorted(commit.files):
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix) :]
            if "/" in rest and not recursive:
                folders.add(prefix + rest.split("/")[0])
                continue
            parts = rest.split("/")[:-1]
            folders.update(prefix + "/".join(parts[: i + 1]) for i in range(len(parts)))
            entries.append(commit.files[name].tree_entry(name))
        trees = [{"type": "directory", "oid": hashlib.sha1(f.encode()).hexdigest(), "path": f} for f in sorted(folders)]
        return 200, {}, trees + entries

    def api_paths_info(self, body: bytes, repo: str, rev: str):
        found = self._repo(repo)
        commit = self._commit(found, rev)
        form = parse_qs(body.decode())
        entries = []
        for path in form.get("paths", []):
            if path in commit.files:
                entries.append(commit.files[path].tree_entry(path))
            elif any(name.startswith(path.rstrip("/") + "/") for name in commit.files):
                entries.append({"type": "directory", "oid": hashlib.sha1(path.encode()).hexdigest(), "path": path})
        return 200, {}, entries

    def api_preupload(self, body: bytes, repo: str, rev: str):
        found = self._repo(repo, write=True)
        commit = found.resolve(rev)
        if commit is None and not self.query.get("create_pr"):
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        files = []
        for item in self._json(body).get("files", []):
            lfs = item["size"] >= LFS_THRESHOLD or _matches_lfs(item["path"])
            existing = commit.files.get(item["path"]) if commit else None
            oid = None if existing is None else (existing.sha256 if existing.lfs else existing.git_oid)
            files.append(
                {"path": item["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid}
            )
        return 200, {}, {"files": files, "commitOid": commit.oid if commit else None}

    def api_lfs_batch(self, body: bytes, repo: str):
        self._repo(repo, write=True)
        payload = self._json(body)
        if payload.get("operation") != "upload":
            raise HubError(400, "The local Hub's LFS batch API handles uploads only")
        objects = []
        for item in payload.get("objects", []):
            answer = {"oid": item["oid"], "size": item["size"], "authenticated": True}
            if (repo, item["oid"]) not in self.hub.lfs:  # an object the repository has needs no upload
                answer["actions"] = {
                    "upload": {"href": f"{self.hub.url}/{repo}/lfs-upload/{item['oid']}"},
                    "verify": {"href": f"{self.hub.url}/{repo}/lfs-verify"},
                }
            objects.append(answer)
        return 200, {"Content-Type": "application/vnd.git-lfs+json"}, {"transfer": "basic", "objects": objects}

    def api_lfs_upload(self, body: bytes, repo: str, oid: str):
        # Like a presigned storage URL: no token needed, the content must match the announced sha256.
        if hashlib.sha256(body).hexdigest() != oid:
            raise HubError(400, "Uploaded content does not match its sha256")
        with self.hub._lock:
            self.hub.lfs[(repo, oid)] = body
        return 200, {}, b""

    def api_lfs_verify(self, body: bytes, repo: str):
        self._repo(repo, write=True)
        payload = self._json(body)
        stored = self.hub.lfs.get((repo, payload.get("oid", "")))
        if stored is None or len(stored) != payload.get("size"):
            raise HubError(404, "LFS object not found or of the wrong size")
        return 200, {}, {}

    def api_commit(self, body: bytes, repo: str, rev: str):
        found = self._repo(repo, write=True)
        user = self._user()
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The commit payload must start with a header line")
        header = lines[0]["value"]
        if not header.get("summary"):
            raise HubError(400, "A commit needs a summary")
        with self.hub._lock:
            base = self._commit(found, rev)
            if header.get("parentCommit") and not base.oid.startswith(header["parentCommit"]):
                raise HubError(412, f"The branch moved: {rev} is at {base.oid}, not {header['parentCommit']}")
            files = dict(base.files)
            for line in lines[1:]:
                key, value = line["key"], line["value"]
                if key == "file":
                    files[value["path"]] = Blob(base64.b64decode(value["content"]), lfs=False)
                elif key == "lfsFile":
                    data = self.hub.lfs.get((found.repo_id, value["oid"]))
                    if data is None:
                        raise HubError(422, f"LFS object {value['oid']} ({value['path']}) was never uploaded")
                    files[value["path"]] = Blob(data, lfs=True)
                elif key == "deletedFile":
                    if files.pop(value["path"], None) is None:
                        raise HubError(404, f"A file with this name doesn't exist: {value['path']}", "EntryNotFound")
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    files = {path: blob for path, blob in files.items() if not path.startswith(prefix)}
                else:
                    raise HubError(400, f"The local Hub does not handle commit operations of type {key!r}")
            commit = Commit(
                self.hub._new_oid(found.repo_id, rev),
                base.oid,
                files,
                header["summary"],
                header.get("description", ""),
                user,
            )
            found.commits[commit.oid] = commit
            pr_url = None
            if self.query.get("create_pr"):
                found.num_prs += 1
                found.refs[f"refs/pr/{found.num_prs}"] = commit.oid
                pr_url = f"{self.hub.url}/{found.repo_id}/discussions/{found.num_prs}"
            else:
                found.refs[rev.removeprefix("refs/heads/")] = commit.oid
        payload = {
            "success": True,
            "commitOid": commit.oid,
            "commitUrl": f"{self.hub.url}/{found.repo_id}/commit/{commit.oid}",
            "pullRequestUrl": pr_url,
        }
        return 200, {}, payload

    def api_create_branch(self, body: bytes, repo: str, branch: str):
        found = self._repo(repo, write=True)
        if branch.startswith("refs/") or not re.fullmatch(r"[A-Za-z0-9._/-]+", branch):
            raise HubError(400, f"Invalid branch name: {branch}")
        starting = self._json(body).get("startingPoint") or "main"
        with self.hub._lock:
            if branch in found.refs:
                raise HubError(409, f"Reference already exists: refs/heads/{branch}")
            found.refs[branch] = self._commit(found, starting).oid
        return 200, {}, {}

    def api_resolve(self, body: bytes, repo: str, rev: str, path: str):
        found = self._repo(repo)
        commit = self._commit(found, rev)
        blob = commit.files.get(path)
        if blob is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
        headers = {
            "Content-Type": "application/octet-stream",
            "ETag": f'"{blob.etag}"',
            "X-Repo-Commit": commit.oid,
            "Accept-Ranges": "bytes",
        }
        if blob.lfs:  # the Hub answers LFS files with these "linked" headers (and a CDN redirect, skipped here)
            headers.update({"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(len(blob.data))})
        return 200, headers, blob.data


def _matches_lfs(path: str) -> bool:
    name = path.rsplit("/", 1)[-1]
    return any(name.endswith(pattern[1:]) for pattern in LFS_PATTERNS)
