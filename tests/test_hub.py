"""Downloading from the Hub (grok/checkpoint/hub.py), against a local stand-in for the Hub: no network.

`FakeHub` is a small HTTP server on 127.0.0.1 that answers the requests `huggingface_hub` makes for
`snapshot_download`: model info (`/api/models/REPO[/revision/REV]`), the file tree
(`/api/models/REPO/tree/REV[/PATH]`) and file downloads (`HEAD`/`GET /REPO/resolve/REV/PATH`, with
`Range` requests). It serves a tiny demo checkpoint and a stand-in tokenizer file, records every
request, and can be told to cut a transfer short or fail it.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from huggingface_hub import constants
from test_grok2_model import TINY as GROK2_TINY
from test_grok2_release import bf16_params, write_release

from grok import PRESETS
from grok.checkpoint import hub
from grok.checkpoint.demo import write_demo_checkpoint
from grok.checkpoint.files import CheckpointError, resolve_checkpoint_dir, tensor_file_name
from grok.checkpoint.read import read_checkpoint
from grok.model import weights

CONFIG = PRESETS["tiny"]
REPO = "xai-org/grok-1"
MAIN = "a1" * 20  # commit of "main": the checkpoint under ckpt-0/
OLD = "b2" * 20  # commit of tag "v0": the same files under ckpt/, as older revisions have them
BARE = "c3" * 20  # commit of tag "bare": no checkpoint at all
NAMES, _ = weights.flatten(weights.checkpoint_shapes(CONFIG))
EMBEDDINGS = f"ckpt-0/{tensor_file_name(0)}"  # the largest file of the tiny checkpoint (64 KiB)


class FakeHub:
    """A Hub stand-in: `repos[commit]` is {path: bytes}; `refs` maps branch and tag names to commits.

    `faults[path]` is a list of what to do on the next GETs of that path, one entry per GET:
    ("drop", n) sends n bytes of the body then closes the connection, ("status", code) fails.
    `requests` records (method, path in the repository, Range header) of every file request.
    """

    def __init__(self, repos: dict[str, dict[str, bytes]], refs: dict[str, str], repo: str = REPO) -> None:
        self.repos, self.refs, self.repo = repos, refs, repo
        self.faults: dict[str, list[tuple[str, int]]] = {}
        self.requests: list[tuple[str, str, str | None]] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def gets(self, path: str | None = None) -> list[tuple[str, str, str | None]]:
        with self.lock:
            return [r for r in self.requests if r[0] == "GET" and (path is None or r[1] == path)]

    def _commit(self, revision: str) -> str | None:
        revision = unquote(revision)
        return revision if revision in self.repos else self.refs.get(revision)

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep the test output quiet
                pass

            def do_HEAD(self) -> None:
                self._route(body=False)

            def do_GET(self) -> None:
                self._route(body=True)

            def _route(self, body: bool) -> None:
                path = urlsplit(self.path).path
                api = re.fullmatch(rf"/api/models/{hub.repo}(?:/revision/([^/]+))?", path)
                tree = re.fullmatch(rf"/api/models/{hub.repo}/tree/([^/]+)(/.*)?", path)
                resolve = re.fullmatch(rf"/{hub.repo}/resolve/([^/]+)/(.+)", path)
                if api:
                    self._info(api.group(1) or "main")
                elif tree:
                    recursive = "recursive=true" in self.path.lower()
                    self._tree(tree.group(1), unquote(tree.group(2) or "/").strip("/"), recursive)
                elif resolve:
                    self._file(resolve.group(1), unquote(resolve.group(2)), body)
                else:
                    self._error(404, "RepoNotFound")

            def _error(self, status: int, code: str) -> None:
                data = json.dumps({"error": code}).encode()
                self.send_response(status)
                self.send_header("X-Error-Code", code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _json(self, value) -> None:
                data = json.dumps(value).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _info(self, revision: str) -> None:
                commit = hub._commit(revision)
                if commit is None:
                    return self._error(404, "RevisionNotFound")
                files = [{"rfilename": p} for p in sorted(hub.repos[commit])]
                self._json({"id": hub.repo, "modelId": hub.repo, "sha": commit, "private": False, "siblings": files})

            def _tree(self, revision: str, under: str, recursive: bool) -> None:
                commit = hub._commit(revision)
                if commit is None:
                    return self._error(404, "RevisionNotFound")
                prefix = f"{under}/" if under else ""
                entries: dict[str, dict] = {}
                for path, data in sorted(hub.repos[commit].items()):
                    if not path.startswith(prefix):
                        continue
                    parts = path[len(prefix):].split("/")
                    for depth in range(1, len(parts)):  # the folders on the way
                        folder = prefix + "/".join(parts[:depth])
                        if recursive or depth == 1:
                            entries.setdefault(folder, {"type": "directory", "path": folder, "oid": "0" * 40})
                    if recursive or len(parts) == 1:
                        oid = hashlib.sha1(data).hexdigest()
                        entries[path] = {"type": "file", "path": path, "size": len(data), "oid": oid}
                self._json(list(entries.values()))

            def _file(self, revision: str, path: str, body: bool) -> None:
                commit = hub._commit(revision)
                with hub.lock:
                    hub.requests.append(("GET" if body else "HEAD", path, self.headers.get("Range")))
                    fault = hub.faults[path].pop(0) if body and hub.faults.get(path) else None
                if commit is None:
                    return self._error(404, "RevisionNotFound")
                data = hub.repos[commit].get(path)
                if data is None:
                    return self._error(404, "EntryNotFound")
                if fault is not None and fault[0] == "status":
                    return self._error(fault[1], "Injected")
                start = 0
                range_header = self.headers.get("Range")
                if range_header:
                    start = int(re.fullmatch(r"bytes=(\d+)-", range_header).group(1))
                self.send_response(206 if range_header else 200)
                self.send_header("X-Repo-Commit", commit)
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(len(data) - start))
                if range_header:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if not body:
                    return
                if fault is not None and fault[0] == "drop":
                    self.wfile.write(data[start : start + fault[1]])
                    self.wfile.flush()
                    self.close_connection = True  # the client sees the body end early
                    return
                self.wfile.write(data[start:])

        return Handler


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> dict[str, bytes]:
    """The files of the stand-in repository at "main": a tiny checkpoint and a tokenizer stand-in."""
    directory = write_demo_checkpoint(tmp_path_factory.mktemp("release") / "ckpt-0", CONFIG)
    files = {f"ckpt-0/{p.name}": p.read_bytes() for p in sorted(directory.iterdir())}
    files["tokenizer.model"] = b"stand-in SentencePiece model\n" * 10
    files["README.md"] = b"# Grok-1\n"
    return files


@pytest.fixture
def fake_hub(release, tmp_path, monkeypatch):
    """A running FakeHub, with `huggingface_hub` pointed at it and its caches kept in tmp_path."""
    old = {re.sub(r"^ckpt-0/", "ckpt/", path): data for path, data in release.items()}
    bare = {"README.md": release["README.md"]}
    point_at_fake_hub(tmp_path, monkeypatch)
    with FakeHub({MAIN: dict(release), OLD: old, BARE: bare}, {"main": MAIN, "v0": OLD, "bare": BARE}) as server:
        yield server


def point_at_fake_hub(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


def assert_same_files(local_dir: Path, release: dict[str, bytes], subdir: str = "ckpt-0") -> None:
    for path, data in release.items():
        if path.startswith("ckpt-0/") or path == "tokenizer.model":
            local = local_dir / path.replace("ckpt-0/", f"{subdir}/")
            assert local.read_bytes() == data, path


# ------------------------------------------------------------------------------------ download


def test_download_fetches_checkpoint_and_tokenizer_only(fake_hub, release, tmp_path):
    local_dir = tmp_path / "checkpoints"
    directory = hub.download(REPO, local_dir, endpoint=fake_hub.url, progress=False)
    assert directory == local_dir / "ckpt-0"
    assert_same_files(local_dir, release)
    assert not (local_dir / "README.md").exists()  # only ckpt-0/* and tokenizer.model
    hub.verify_download(local_dir, CONFIG)
    loaded = read_checkpoint(local_dir, CONFIG, progress=False)
    assert weights.flatten(loaded)[0] == NAMES

    # A second run finds everything complete: no file is transferred again.
    before = len(fake_hub.gets())
    assert hub.download(REPO, local_dir, endpoint=fake_hub.url, progress=False) == directory
    assert len(fake_hub.gets()) == before


def test_cut_transfer_resumes_with_a_range_request(fake_hub, release, tmp_path, monkeypatch):
    # huggingface_hub writes what it receives in chunks of DOWNLOAD_CHUNK_SIZE (10 MiB); make them
    # small so that part of this 64 KiB file is on disk when the connection drops.
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 4096)
    cut = 40_000
    fake_hub.faults[EMBEDDINGS] = [("drop", cut)]
    local_dir = tmp_path / "checkpoints"
    hub.download(REPO, local_dir, endpoint=fake_hub.url, progress=False)

    first, second = fake_hub.gets(EMBEDDINGS)
    assert first[2] is None
    resumed_at = int(re.fullmatch(r"bytes=(\d+)-", second[2]).group(1))
    assert 0 < resumed_at <= cut  # continued from what it had, not from the start
    assert_same_files(local_dir, release)
    hub.verify_download(local_dir, CONFIG)


def test_failed_download_continues_when_run_again(fake_hub, release, tmp_path):
    failing = f"ckpt-0/{tensor_file_name(5)}"
    fake_hub.faults[failing] = [("status", 500)]
    local_dir = tmp_path / "checkpoints"
    with pytest.raises(hub.DownloadError, match="Run it again to continue"):
        hub.download(REPO, local_dir, endpoint=fake_hub.url, progress=False)
    with pytest.raises(CheckpointError, match=rf"tensor files missing: .*{tensor_file_name(5)} \({NAMES[5]}\)"):
        hub.verify_download(local_dir, CONFIG)
    complete = {path for path in release if (local_dir / path).is_file()}
    assert complete and failing not in complete

    requests_before = len(fake_hub.requests)
    hub.download(REPO, local_dir, endpoint=fake_hub.url, progress=False)
    fetched_again = {path for method, path, _ in fake_hub.requests[requests_before:] if method == "GET"}
    assert failing in fetched_again
    assert not fetched_again & complete  # what the first run completed is kept, not fetched again
    assert_same_files(local_dir, release)
    hub.verify_download(local_dir, CONFIG)


def test_older_revision_with_ckpt_directory(fake_hub, release, tmp_path):
    local_dir = tmp_path / "checkpoints"
    directory = hub.download(REPO, local_dir, revision="v0", endpoint=fake_hub.url, progress=False)
    assert directory == local_dir / "ckpt"
    assert not (local_dir / "ckpt-0").exists()
    assert_same_files(local_dir, release, subdir="ckpt")
    hub.verify_download(local_dir, CONFIG)
    assert resolve_checkpoint_dir(local_dir) == directory
    read_checkpoint(local_dir, CONFIG, progress=False)


def test_revision_without_checkpoint_is_refused(fake_hub, tmp_path):
    with pytest.raises(hub.DownloadError, match=r"does not hold ckpt-0/ \(or ckpt/\) and tokenizer.model; .*README.md"):
        hub.download(REPO, tmp_path / "checkpoints", revision="bare", endpoint=fake_hub.url, progress=False)


def test_unreachable_hub_is_a_download_error(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler) as closed:
        url = f"http://127.0.0.1:{closed.server_address[1]}"  # bound but never serving, then closed
    with pytest.raises(hub.DownloadError, match=f"cannot list {REPO}"):
        hub.download(REPO, tmp_path, endpoint=url, progress=False)


# ------------------------------------------------------------------------------------ verify


@pytest.fixture
def downloaded(release, tmp_path) -> Path:
    """A complete download, laid out as `download` leaves it (without the Hub)."""
    for path, data in release.items():
        if path.startswith("ckpt-0/") or path == "tokenizer.model":
            (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / path).write_bytes(data)
    return tmp_path


def test_verify_reports_missing_truncated_and_unexpected_files(downloaded):
    hub.verify_download(downloaded, CONFIG)
    ckpt = downloaded / "ckpt-0"
    (ckpt / tensor_file_name(3)).unlink()
    truncated = ckpt / tensor_file_name(7)
    truncated.write_bytes(truncated.read_bytes()[:100])
    (ckpt / tensor_file_name(len(NAMES))).write_bytes(b"x")
    (downloaded / "tokenizer.model").unlink()
    with pytest.raises(CheckpointError) as info:
        hub.verify_download(downloaded, CONFIG)
    message = str(info.value)
    assert f"incomplete checkpoint in {ckpt}" in message
    assert f"1 of {len(NAMES)} tensor files missing: {tensor_file_name(3)} ({NAMES[3]})" in message
    assert f"1 truncated: {tensor_file_name(7)} ({NAMES[7]}: 100 of at least " in message
    assert f"1 unexpected for this config: {tensor_file_name(len(NAMES))}" in message
    assert "tokenizer.model missing" in message


def test_verify_lists_a_few_names_and_the_count(downloaded):
    for i in range(9):
        (downloaded / "ckpt-0" / tensor_file_name(i)).unlink()
    with pytest.raises(CheckpointError, match=rf"9 of {len(NAMES)} tensor files missing: .*, \.\.\. \(4 more\)") as err:
        hub.verify_download(downloaded, CONFIG)
    assert tensor_file_name(4) in str(err.value) and tensor_file_name(5) not in str(err.value)


def test_verify_rejects_files_much_larger_than_their_tensors(downloaded):
    path = downloaded / "ckpt-0" / tensor_file_name(1)
    path.write_bytes(path.read_bytes() + bytes(hub.PICKLE_OVERHEAD + 1))
    with pytest.raises(CheckpointError, match=f"1 larger than their tensors: {tensor_file_name(1)}"):
        hub.verify_download(downloaded, CONFIG)


def test_verify_knows_the_grok1_file_count(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="770 of 770 tensor files missing: tensor00000_000 "):
        hub.verify_download(tmp_path, PRESETS["grok-1"])


def test_release_files_have_plausible_sizes(release):
    """The size bounds hold for files written like the release's (pickle overhead well inside the allowance)."""
    _, expected = weights.flatten(weights.checkpoint_shapes(CONFIG))
    for i, want in enumerate(expected):
        size, payload = len(release[f"ckpt-0/{tensor_file_name(i)}"]), hub._payload_bytes(want)
        assert payload <= size <= payload + 1024, (i, size, payload)


def test_copy_of_release_layout_is_found_by_verify(downloaded, tmp_path_factory):
    other = tmp_path_factory.mktemp("legacy")
    shutil.copytree(downloaded / "ckpt-0", other / "ckpt")
    shutil.copy(downloaded / "tokenizer.model", other)
    hub.verify_download(other, CONFIG)


# ------------------------------------------------------------------------------------ Grok-2


def test_grok2_download_fetches_the_release_and_verifies_it(tmp_path, monkeypatch):
    """xai-org/grok-2's layout: safetensors and tokenizer.tok.json at the top, into local_dir itself."""
    written = write_release(tmp_path / "written", bf16_params(GROK2_TINY, 1), GROK2_TINY)
    files = {p.name: p.read_bytes() for p in sorted(written.iterdir())}
    files["tokenizer.tok.json"] = b'{"regular_tokens": [], "special_tokens": [], "word_split": "V1"}'
    files["README.md"] = b"# Grok-2\n"
    point_at_fake_hub(tmp_path, monkeypatch)
    local_dir = tmp_path / "grok-2"
    with FakeHub({MAIN: files}, {"main": MAIN}, repo="xai-org/grok-2") as server:
        assert hub.download("xai-org/grok-2", local_dir, endpoint=server.url, progress=False) == local_dir
    assert sorted(p.name for p in local_dir.iterdir() if p.is_file()) == sorted(set(files) - {"README.md"})
    hub.verify_download(local_dir, GROK2_TINY)
    rank = local_dir / "pytorch_model-00003-TP-005.safetensors"
    rank.write_bytes(rank.read_bytes()[:-100])  # cut short
    with pytest.raises(CheckpointError, match="incomplete checkpoint in .*TP-005.safetensors"):
        hub.verify_download(local_dir, GROK2_TINY)
    rank.unlink()
    with pytest.raises(CheckpointError, match=r"no \*-TP-005.safetensors \(TP rank 5 of 8\)"):
        hub.verify_download(local_dir, GROK2_TINY)
