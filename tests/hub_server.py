"""A Hugging Face hub on loopback for tests: the endpoints huggingface_hub calls to fetch a
model's files, served from folders on disk, with a log of every request.

    GET  /api/models/{repo}[/revision/{rev}]     model info: the commit (sha), the files
    GET  /api/models/{repo}/tree/{rev}[/{path}]  the file list snapshot_download reads
    HEAD /{repo}/resolve/{rev}/{file}            X-Repo-Commit, ETag, Content-Length
    GET  /{repo}/resolve/{rev}/{file}            the bytes

A revision is a branch, a tag or a commit (40 hex digits). Errors carry X-Error-Code as the
hub's do (RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo): huggingface_hub turns
them into its exception types. A gated repository answers only requests that carry its token.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


@dataclass
class Repo:
    commits: dict[str, dict[str, Path]] = field(default_factory=dict)  # commit -> name -> file
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag -> commit
    token: str | None = None  # gated: only requests with this token get in


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # as sent, %-quoted
    repo: str | None
    file: str | None  # for /resolve/ requests


class FakeHub:
    """`with FakeHub() as hub:` serves on 127.0.0.1 (hub.url) until the block ends."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.log: list[Request] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        # Polled for shutdown 20 times a second: the end of a test waits for one poll.
        serve = {"poll_interval": 0.05}
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs=serve, daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def add(
        self,
        repo_id: str,
        files: dict[str, Path],
        refs: tuple[str, ...] = ("main",),
        token: str | None = None,
    ) -> str:
        """A commit of `files` (name in the repository -> file here) that `refs` now point
        to; its id (40 hex digits, as the hub's)."""
        repo = self.repos.setdefault(repo_id, Repo())
        repo.token = token
        commit = hashlib.sha1(f"{repo_id} {len(repo.commits)} {sorted(files)}".encode())
        commit_id = commit.hexdigest()
        repo.commits[commit_id] = dict(files)
        repo.refs.update(dict.fromkeys(refs, commit_id))
        return commit_id

    def fetched(self, repo_id: str) -> list[str]:
        """The files of `repo_id` whose bytes were sent (GET), in order."""
        return [r.file for r in self.log if r.method == "GET" and r.repo == repo_id and r.file]


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self._answer(body=True)

        def do_HEAD(self) -> None:
            self._answer(body=False)

        def log_message(self, format: str, *args: object) -> None:
            return None  # the hub's log is `hub.log`

        def _answer(self, body: bool) -> None:
            parts = [unquote(part) for part in urlsplit(self.path).path.strip("/").split("/")]
            api = parts[:2] == ["api", "models"]
            repo_id = "/".join(parts[2:4] if api else parts[:2])
            rest = parts[4:] if api else parts[2:]
            resolve = not api and rest[:1] == ["resolve"]
            file = "/".join(rest[2:]) if resolve else None
            hub.log.append(Request(self.command, self.path, repo_id, file))
            repo = hub.repos.get(repo_id)
            if repo is None:
                return self._error(404, "RepoNotFound")
            if repo.token and self.headers.get("Authorization") != f"Bearer {repo.token}":
                return self._error(401 if "Authorization" not in self.headers else 403, "GatedRepo")
            if api and not rest:
                rest = ["revision", "main"]
            if len(rest) < 2 or rest[0] not in ("revision", "tree", "resolve"):
                return self._error(400, "BadRequest")
            commit = repo.refs.get(rest[1], rest[1] if rest[1] in repo.commits else None)
            if commit is None:
                return self._error(404, "RevisionNotFound")
            files = repo.commits[commit]
            if rest[0] == "revision":
                siblings = [{"rfilename": name} for name in sorted(files)]
                return self._json({"id": repo_id, "sha": commit, "siblings": siblings})
            if rest[0] == "tree":
                entries = [
                    {"type": "file", "path": name, "size": path.stat().st_size, "oid": _oid(path)}
                    for name, path in sorted(files.items())
                ]
                return self._json(entries)
            assert file is not None
            if file not in files:
                return self._error(404, "EntryNotFound", {"X-Repo-Commit": commit})
            data = files[file].read_bytes()
            self.send_response(200)
            self.send_header("X-Repo-Commit", commit)
            self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)

        def _json(self, value: object) -> None:
            data = json.dumps(value).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command == "GET":
                self.wfile.write(data)

        def _error(self, status: int, code: str, headers: dict[str, str] | None = None) -> None:
            data = json.dumps({"error": code}).encode()
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command == "GET":
                self.wfile.write(data)

    return Handler


def _oid(path: Path) -> str:
    """The git blob id of a file, as the hub lists it."""
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def folder_files(folder: Path) -> dict[str, Path]:
    """Every file under `folder`, by its path in the repository."""
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}


def request_lines(hub: FakeHub) -> Iterator[str]:
    """`METHOD PATH` per request, for assertion messages."""
    return (f"{r.method} {r.path}" for r in hub.log)
