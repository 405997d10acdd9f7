"""Regression tests for the node's hardening: tampered trees, crashes, races, hostile mirrors."""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from contextlib import closing
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from relman.cas.canonical import canonical_bytes
from tests.support import (
    RELMAN,
    MirrorProcess,
    RelayProxy,
    make_release_tree,
    openssl_sign,
    publish_version,
    relman,
    wait_for,
)

BIG = 256 * 1024
STAGING_VERSION = "1.0.0-rc.staging-1"
VERSIONS = (STAGING_VERSION, "1.0.0", "1.1.0")
# A text file that gzip shrinks to a small fraction of its size.
TABLE = "share/data/table.csv"


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> dict:
    """A repository with 1.0.0-rc.staging-1 and 1.0.0 (the same tree) and 1.1.0.

    1.1.0 changes big.bin and app.conf and keeps bin/server, whose deployed
    mode 0555 makes the node keep a copy of it under store/modes/0555/.
    """
    work = tmp_path_factory.mktemp("published")
    pki = work / "pki"
    relman("pki", "init", pki)
    first = make_release_tree(work / "tree-1.0.0", big_size=BIG, seed=1)
    (first / TABLE).write_text("id,name,price\n" * 4096)
    second = work / "tree-1.1.0"
    shutil.copytree(first, second, symlinks=True)
    (second / "share" / "data" / "big.bin").write_bytes(os.urandom(BIG))
    (second / "etc" / "app.conf").write_text("port = 9090\n")
    repo = work / "repo"
    publish_version(work, pki, repo, STAGING_VERSION, first)
    publish_version(work, pki, repo, "1.0.0", first)
    publish_version(work, pki, repo, "1.1.0", second)
    return {"pki": pki, "repo": repo, "work": work}


@pytest.fixture(scope="module")
def mirror(published: dict):
    server = MirrorProcess(published["repo"])
    yield server
    server.stop()


@pytest.fixture(scope="module")
def pulled_template(tmp_path_factory, published: dict, mirror) -> Path:
    """A node root with every published version pulled and nothing applied."""
    root = tmp_path_factory.mktemp("template") / "node"
    for version in VERSIONS:
        pull(mirror.url, root, published["pki"] / "ca.pem", version)
    return root


@pytest.fixture
def node(tmp_path: Path, pulled_template: Path) -> Path:
    """A private copy of the pulled node root."""
    root = tmp_path / "node"
    shutil.copytree(pulled_template, root, symlinks=True)
    return root


def pull(
    url: str, root: Path, ca: Path, version: str, check: bool = True
) -> subprocess.CompletedProcess:
    return relman(
        "pull",
        "--mirror",
        url,
        "--root",
        root,
        "--trust",
        ca,
        "--version",
        version,
        "--json",
        check=check,
    )


def apply(
    root: Path, version: str, check: bool = True, *extra: str
) -> subprocess.CompletedProcess:
    return relman(
        "apply", "--root", root, "--version", version, "--json", *extra, check=check
    )


def rollback(root: Path, check: bool = True) -> subprocess.CompletedProcess:
    return relman("rollback", "--root", root, "--json", check=check)


def status(root: Path) -> dict:
    return json.loads(relman("status", "--root", root, "--json").stdout)


def manifest_files(published: dict, version: str) -> dict[str, dict]:
    body = (published["repo"] / "manifests" / version / "manifest.json").read_bytes()
    return {entry["path"]: entry for entry in json.loads(body)["files"]}


def digest_of(published: dict, version: str, path: str) -> str:
    return manifest_files(published, version)[path]["sha256_hash"]


def blob(root: Path, digest: str) -> Path:
    return root / "store" / "objects" / "sha256" / digest[:2] / digest[2:]


def mode_copy(root: Path, digest: str, mode: int) -> Path:
    return root / "store" / "modes" / f"{mode:04o}" / digest[:2] / digest[2:]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def overwrite_same_size(path: Path) -> None:
    """Make a read-only deployed file writable and flip every byte, keeping its inode."""
    data = path.read_bytes()
    os.chmod(path, mode_of(path) | stat.S_IWUSR)
    with open(path, "r+b") as stream:
        stream.write(bytes(byte ^ 0xFF for byte in data))


def release_paths(tree: Path) -> set[str]:
    """Return every file and symlink below ``tree``, relative to it."""
    return {
        str(path.relative_to(tree))
        for path in tree.rglob("*")
        if path.is_symlink() or not path.is_dir()
    }


def hidden_entries(root: Path) -> list[str]:
    return sorted(name for name in os.listdir(root / "releases") if name[0] == ".")


def mismatched_blobs(root: Path) -> list[str]:
    """Return the blobs in the store whose bytes do not hash to their name."""
    objects = root / "store" / "objects" / "sha256"
    wrong = []
    for path in objects.glob("*/*"):
        if sha256(path) != path.parent.name + path.name:
            wrong.append(str(path))
    return wrong


class CurrentWatcher:
    """Polls a file through ``current`` in a thread while a command runs.

    ``missed`` counts polls where the file could not be found through
    ``current``, and ``planted_seen`` counts polls that found ``planted``.
    """

    def __init__(self, root: Path, probe: str, planted: str | None = None) -> None:
        self.probe = root / "current" / probe
        self.planted = root / "current" / planted if planted else None
        self.missed = 0
        self.planted_seen = 0
        self.polls = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.polls += 1
            if not self.probe.is_file():
                self.missed += 1
            if self.planted is not None and os.path.lexists(self.planted):
                self.planted_seen += 1
            time.sleep(0.0005)

    def __enter__(self) -> CurrentWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(5)


class HostileMirror:
    """An HTTP server on 127.0.0.1 that serves a repository folder and misbehaves on request.

    It builds each envelope from the raw files in ``manifests/<version>/`` and
    checks nothing, unlike ``relman serve``. ``envelope_text`` rewrites the
    JSON text of an envelope, ``redirect_to`` makes every API request get a
    302 to that base URL, and ``blob_responses`` replaces the response for
    a digest with (headers, body). Every requested path is kept in ``paths``.
    """

    def __init__(self, repo: Path) -> None:
        self.repo = repo
        self.envelope_text = None
        self.redirect_to: str | None = None
        self.blob_responses: dict[str, tuple[dict[str, str], bytes]] = {}
        self.paths: list[str] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def envelope(self, version: str) -> dict:
        folder = self.repo / "manifests" / version
        body = (folder / "manifest.json").read_bytes()
        envelope = json.loads(body)
        envelope["manifest_hash"] = hashlib.sha256(body).hexdigest()
        envelope["signature"] = base64.b64encode(
            (folder / "manifest.json.sig").read_bytes()
        ).decode("ascii")
        envelope["signing_certificate"] = None
        envelope["timestamp_token"] = None
        return envelope

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        mirror = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *arguments: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                mirror.paths.append(self.path)
                prefix = "/api/updates/manifests/"
                if self.path.startswith(prefix):
                    mirror._send_envelope(self, self.path[len(prefix) :])
                elif self.path.startswith("/objects/sha256/"):
                    mirror._send_blob(self, self.path.split("/", 3)[3])
                else:
                    self.send(404, {}, b"not found")

            def send(self, status: int, headers: dict[str, str], body: bytes) -> None:
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        return Handler

    def _send_envelope(self, handler, version: str) -> None:  # noqa: ANN001
        if self.redirect_to is not None:
            location = f"{self.redirect_to}/api/updates/manifests/{version}"
            handler.send(302, {"Location": location}, b"")
            return
        text = json.dumps(self.envelope(version))
        if self.envelope_text is not None:
            text = self.envelope_text(text)
        handler.send(200, {"Content-Type": "application/json"}, text.encode())

    def _send_blob(self, handler, relative: str) -> None:  # noqa: ANN001
        digest = relative.replace("/", "")
        if digest in self.blob_responses:
            headers, body = self.blob_responses[digest]
            handler.send(200, headers, body)
            return
        path = self.repo / "objects" / "sha256" / relative
        if not path.is_file():
            handler.send(404, {}, b"not found")
            return
        handler.send(200, {"ETag": f'"{digest}"'}, path.read_bytes())

    def blob_requests(self) -> list[str]:
        return [path for path in self.paths if path.startswith("/objects/")]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)


@pytest.fixture
def hostile(published: dict):
    server = HostileMirror(published["repo"])
    yield server
    server.stop()


def sign_manifest(pki: Path, body: dict, folder: Path) -> None:
    """Write ``body`` as canonical manifest.json into ``folder`` and sign it with openssl cms."""
    folder.mkdir(parents=True)
    manifest = folder / "manifest.json"
    manifest.write_bytes(canonical_bytes(body))
    openssl_sign(manifest, pki / "signer.pem", pki / "signer.key", check=True)


# A version whose name contains the mark of apply's staging folders.


def test_staging_version_survives_next_pull(
    node: Path, published: dict, mirror
) -> None:
    apply(node, STAGING_VERSION)
    pull(mirror.url, node, published["pki"] / "ca.pem", "1.1.0")
    assert (node / "releases" / STAGING_VERSION).is_dir()
    assert (node / "current" / "etc" / "app.conf").is_file()


def test_staging_version_survives_later_apply(node: Path) -> None:
    apply(node, STAGING_VERSION)
    apply(node, "1.0.0")
    assert (node / "releases" / STAGING_VERSION).is_dir()
    assert (node / "previous" / "etc" / "app.conf").is_file()
    result = json.loads(rollback(node).stdout)
    assert result["version"] == STAGING_VERSION
    assert os.readlink(node / "current") == f"releases/{STAGING_VERSION}"
    assert (node / "current" / "etc" / "app.conf").read_text() == "port = 8080\n"


def test_staging_version_listed_in_status(node: Path) -> None:
    apply(node, STAGING_VERSION)
    report = status(node)
    assert report["current"] == STAGING_VERSION
    assert report["releases"] == [STAGING_VERSION]


# Tampered deployed files and store copies.


def test_tampered_executable_same_version_rebuilt(node: Path, published: dict) -> None:
    digest = digest_of(published, "1.0.0", "bin/server")
    apply(node, "1.0.0")
    deployed = node / "releases" / "1.0.0" / "bin" / "server"
    assert deployed.stat().st_ino == mode_copy(node, digest, 0o555).stat().st_ino
    overwrite_same_size(deployed)
    result = json.loads(apply(node, "1.0.0").stdout)
    assert result["reused_tree"] is False
    assert sha256(deployed) == digest
    assert mode_of(deployed) == 0o555
    assert sha256(mode_copy(node, digest, 0o555)) == digest
    assert mode_of(mode_copy(node, digest, 0o555)) == 0o555
    assert os.readlink(node / "current") == "releases/1.0.0"


def test_tampered_executable_other_version_rebuilt(node: Path, published: dict) -> None:
    digest = digest_of(published, "1.1.0", "bin/server")
    assert digest == digest_of(published, "1.0.0", "bin/server")
    apply(node, "1.0.0")
    overwrite_same_size(node / "releases" / "1.0.0" / "bin" / "server")
    apply(node, "1.1.0")
    deployed = node / "current" / "bin" / "server"
    assert os.readlink(node / "current") == "releases/1.1.0"
    assert sha256(deployed) == digest
    assert mode_of(deployed) == 0o555
    assert sha256(mode_copy(node, digest, 0o555)) == digest


def test_tampered_executable_repaired_by_rollback(node: Path, published: dict) -> None:
    digest = digest_of(published, "1.0.0", "bin/server")
    apply(node, "1.0.0")
    apply(node, "1.1.0")
    overwrite_same_size(node / "releases" / "1.0.0" / "bin" / "server")
    result = json.loads(rollback(node).stdout)
    deployed = node / "current" / "bin" / "server"
    assert result["version"] == "1.0.0"
    assert os.readlink(node / "current") == "releases/1.0.0"
    assert sha256(deployed) == digest
    assert mode_of(deployed) == 0o555


@pytest.mark.parametrize(
    ("path", "drifted", "expected"),
    [("share/data/notes.txt", 0o644, 0o444), ("bin/server", 0o755, 0o555)],
)
def test_drifted_mode_is_reset(
    node: Path, published: dict, path: str, drifted: int, expected: int
) -> None:
    apply(node, "1.0.0")
    deployed = node / "releases" / "1.0.0" / path
    os.chmod(deployed, drifted)
    result = apply(node, "1.0.0", False)
    assert result.returncode == 0, result.stderr
    assert mode_of(deployed) == expected
    assert sha256(deployed) == digest_of(published, "1.0.0", path)


def test_corrupt_blob_removed_then_refetched(
    node: Path, published: dict, mirror
) -> None:
    digest = digest_of(published, "1.1.0", "etc/app.conf")
    apply(node, "1.0.0")
    stored = blob(node, digest)
    os.chmod(stored, 0o644)
    stored.write_bytes(b"port = 6666\n")
    result = apply(node, "1.1.0", False)
    assert result.returncode == 3, result.stderr
    assert "has been removed" in result.stderr
    assert not stored.exists()
    assert os.readlink(node / "current") == "releases/1.0.0"
    assert not (node / "releases" / "1.1.0").exists()
    fetched = json.loads(
        pull(mirror.url, node, published["pki"] / "ca.pem", "1.1.0").stdout
    )
    assert fetched["blobs_fetched"] == 1
    apply(node, "1.1.0")
    assert sha256(node / "current" / "etc" / "app.conf") == digest


def test_planted_file_removed_by_rollback(node: Path, published: dict) -> None:
    apply(node, "1.0.0")
    apply(node, "1.1.0")
    planted = node / "releases" / "1.0.0" / "planted.so"
    planted.write_bytes(b"\x7fELF planted")
    with CurrentWatcher(node, "etc/app.conf", "planted.so") as watcher:
        rollback(node)
    assert os.readlink(node / "current") == "releases/1.0.0"
    assert not planted.exists()
    assert watcher.planted_seen == 0
    assert watcher.missed == 0
    assert release_paths(node / "current") == set(manifest_files(published, "1.0.0"))
    assert hidden_entries(node) == []


def test_reapply_swaps_stale_tree_atomically(node: Path, published: dict) -> None:
    apply(node, "1.0.0")
    planted = node / "releases" / "1.0.0" / "lib" / "planted.so"
    planted.write_bytes(b"\x7fELF planted")
    with CurrentWatcher(node, "etc/app.conf") as watcher:
        result = json.loads(apply(node, "1.0.0").stdout)
    assert result["reused_tree"] is False
    assert watcher.polls > 0
    assert watcher.missed == 0
    assert not planted.exists()
    assert os.readlink(node / "current") == "releases/1.0.0"
    assert release_paths(node / "releases" / "1.0.0") == set(
        manifest_files(published, "1.0.0")
    )
    assert hidden_entries(node) == []


# A crash between the renames of `current` and `previous`.

# Runs apply_release(ROOT, VERSION) and exits with status 9 right after the
# first link rename, which points `current` at VERSION.
CRASH_AFTER_FIRST_LINK = """
import os
import sys

from relman.client import deploy

replace_link = deploy._replace_link


def replace_then_crash(root, name, target):
    replace_link(root, name, target)
    os._exit(9)


deploy._replace_link = replace_then_crash
deploy.apply_release(sys.argv[1], sys.argv[2])
"""


def crash_mid_flip(root: Path) -> None:
    """Apply 1.0.0, then apply 1.1.0 in a process that dies after renaming ``current``."""
    apply(root, "1.0.0")
    crashed = subprocess.run(
        [sys.executable, "-c", CRASH_AFTER_FIRST_LINK, str(root), "1.1.0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert crashed.returncode == 9, crashed.stderr
    assert os.readlink(root / "current") == "releases/1.1.0"
    assert not os.path.lexists(root / "previous")
    assert pending_flips(root) == 1


def pending_flips(root: Path) -> int:
    with closing(sqlite3.connect(root / "state.sqlite")) as connection:
        return connection.execute("select count(*) from pending_flip").fetchone()[0]


def deployment_rows(root: Path) -> list[tuple]:
    return [
        (row["action"], row["version"], row["previous_version"])
        for row in status(root)["deployments"]
    ]


def test_interrupted_flip_finished_by_apply(node: Path) -> None:
    crash_mid_flip(node)
    result = json.loads(apply(node, "1.1.0").stdout)
    assert result["previous"] == "1.0.0"
    assert os.readlink(node / "previous") == "releases/1.0.0"
    assert os.readlink(node / "current") == "releases/1.1.0"
    assert pending_flips(node) == 0
    assert deployment_rows(node) == [
        ("apply", "1.1.0", "1.0.0"),
        ("apply", "1.1.0", "1.0.0"),
        ("apply", "1.0.0", None),
    ]


def test_interrupted_flip_finished_by_rollback(node: Path) -> None:
    crash_mid_flip(node)
    result = json.loads(rollback(node).stdout)
    assert result["version"] == "1.0.0"
    assert os.readlink(node / "current") == "releases/1.0.0"
    assert os.readlink(node / "previous") == "releases/1.1.0"
    assert pending_flips(node) == 0
    assert deployment_rows(node) == [
        ("rollback", "1.0.0", "1.1.0"),
        ("apply", "1.1.0", "1.0.0"),
        ("apply", "1.0.0", None),
    ]


# Pulls that race each other or resume from a partial file.


def pull_command(url: str, root: Path, ca: Path, version: str) -> list[str]:
    return [
        *RELMAN,
        "pull",
        "--mirror",
        url,
        "--root",
        str(root),
        "--trust",
        str(ca),
        "--version",
        version,
        "--json",
    ]


def test_concurrent_pulls_are_serialised(
    tmp_path: Path, published: dict, mirror
) -> None:
    root = tmp_path / "node"
    ca = published["pki"] / "ca.pem"
    pull(mirror.url, root, ca, "1.0.0")
    processes = [
        subprocess.Popen(
            pull_command(mirror.url, root, ca, "1.1.0"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [process.communicate(timeout=60) for process in processes]
    old = {
        entry["sha256_hash"] for entry in manifest_files(published, "1.0.0").values()
    }
    new = {
        entry["sha256_hash"] for entry in manifest_files(published, "1.1.0").values()
    }
    assert [process.returncode for process in processes] == [0, 0], outputs
    fetched = [json.loads(stdout)["blobs_fetched"] for stdout, _ in outputs]
    assert sorted(fetched) == [0, len(new - old)]
    assert mismatched_blobs(root) == []
    assert [digest for digest in new if not blob(root, digest).is_file()] == []


# Runs `relman` with the write of store/config.json delayed by 2 seconds, and
# creates the file named by the first argument when the delay starts.
SLOW_STORE_CREATION = """
import sys
import time
from pathlib import Path

from relman.cas import repository
from relman.cli import main

write = repository.atomic_write_bytes


def write_slowly(path, data, *arguments, **options):
    if Path(path).name == "config.json":
        Path(sys.argv[1]).touch()
        time.sleep(2)
    return write(path, data, *arguments, **options)


repository.atomic_write_bytes = write_slowly
sys.exit(main(sys.argv[2:]))
"""


def test_pulls_race_on_new_root(tmp_path: Path, published: dict, mirror) -> None:
    root = tmp_path / "node"
    ca = published["pki"] / "ca.pem"
    marker = tmp_path / "creating-store"
    command = pull_command(mirror.url, root, ca, "1.0.0")[len(RELMAN) :]
    first = subprocess.Popen(
        [sys.executable, "-c", SLOW_STORE_CREATION, str(marker), *command],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(marker.exists, timeout=30)
        second = pull(mirror.url, root, ca, "1.0.0", False)
    except AssertionError as error:
        # Only the second pull's outcome may count as the expected failure.
        raise RuntimeError("the first pull never started creating store/") from error
    finally:
        _, first_stderr = first.communicate(timeout=60)
    if first.returncode != 0:
        raise RuntimeError(f"the first pull failed: {first_stderr}")
    assert second.returncode == 0, second.stderr
    assert mismatched_blobs(root) == []


def plant_partial(root: Path, digest: str, data: bytes, etag: str | None) -> Path:
    partial = root / "store" / "tmp" / "partial"
    partial.mkdir(parents=True, exist_ok=True)
    (partial / digest).write_bytes(data)
    if etag is not None:
        (partial / f"{digest}.etag").write_text(etag)
    return partial / digest


def test_poisoned_partial_is_refetched(tmp_path: Path, published: dict, mirror) -> None:
    root = tmp_path / "node"
    ca = published["pki"] / "ca.pem"
    pull(mirror.url, root, ca, "1.0.0")
    digest = digest_of(published, "1.1.0", "share/data/big.bin")
    plant_partial(root, digest, bytes(BIG // 2), f'"{digest}"')
    result = json.loads(pull(mirror.url, root, ca, "1.1.0").stdout)
    assert result["resumed"] == 1
    assert sha256(blob(root, digest)) == digest
    assert not (root / "store" / "tmp" / "partial" / digest).exists()


def test_partial_without_etag_restarts(tmp_path: Path, published: dict, mirror) -> None:
    root = tmp_path / "node"
    ca = published["pki"] / "ca.pem"
    pull(mirror.url, root, ca, "1.0.0")
    big = manifest_files(published, "1.1.0")["share/data/big.bin"]
    digest = big["sha256_hash"]
    source = published["repo"] / "objects" / "sha256" / digest[:2] / digest[2:]
    plant_partial(root, digest, source.read_bytes()[: BIG // 2], None)
    proxy = RelayProxy(mirror.port)
    try:
        result = json.loads(pull(proxy.url, root, ca, "1.1.0").stdout)
    finally:
        proxy.stop()
    changed_bytes = BIG + len("port = 9090\n")
    assert result["resumed"] == 0
    assert result["bytes_received"] == changed_bytes
    assert not any(b"\r\nrange:" in request.lower() for request in proxy.requests)
    assert sha256(blob(root, digest)) == digest


# Hostile mirror responses.


def assert_clean_failure(result: subprocess.CompletedProcess, code: int) -> None:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr


def test_redirected_envelope_is_rejected(
    tmp_path: Path, published: dict, mirror, hostile: HostileMirror
) -> None:
    hostile.redirect_to = mirror.url
    root = tmp_path / "node"
    result = pull(hostile.url, root, published["pki"] / "ca.pem", "1.0.0", False)
    assert_clean_failure(result, 1)
    assert "redirected" in result.stderr
    assert hostile.blob_requests() == []
    assert list((root / "store" / "objects" / "sha256").iterdir()) == []
    assert not (root / "store" / "manifests" / "1.0.0").exists()


@pytest.mark.parametrize(
    "literal", ["NaN", "Infinity", "1e400", str(2**53 + 1), str(-(2**53) - 1)]
)
def test_unrepresentable_number_is_rejected(
    tmp_path: Path, published: dict, hostile: HostileMirror, literal: str
) -> None:
    hostile.envelope_text = lambda text: text.replace(
        "{", f'{{"hostile": {literal}, ', 1
    )
    root = tmp_path / "node"
    result = pull(hostile.url, root, published["pki"] / "ca.pem", "1.0.0", False)
    assert_clean_failure(result, 3)
    assert "cannot be canonicalised" in result.stderr
    assert hostile.blob_requests() == []


def serve_gzip_blob(
    published: dict, hostile: HostileMirror, path: str, other: bool
) -> str:
    """Make ``hostile`` send the 1.0.0 blob of ``path`` gzip-compressed; return its digest.

    With ``other``, it compresses other bytes of the same size instead: the
    reversed text for TABLE, which stays compressible, else random bytes.
    """
    digest = digest_of(published, "1.0.0", path)
    source = published["repo"] / "objects" / "sha256" / digest[:2] / digest[2:]
    data = source.read_bytes()
    if other:
        data = data[::-1] if path == TABLE else os.urandom(len(data))
    hostile.blob_responses[digest] = (
        {"Content-Encoding": "gzip", "ETag": f'"{digest}"'},
        gzip.compress(data),
    )
    return digest


@pytest.mark.parametrize(
    "path",
    [
        "share/data/big.bin",
        TABLE,
    ],
)
def test_gzip_of_other_bytes_rejected(
    tmp_path: Path, published: dict, hostile: HostileMirror, path: str
) -> None:
    digest = serve_gzip_blob(published, hostile, path, other=True)
    root = tmp_path / "node"
    result = pull(hostile.url, root, published["pki"] / "ca.pem", "1.0.0", False)
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr
    assert not blob(root, digest).exists()
    assert mismatched_blobs(root) == []
    assert not (root / "store" / "manifests" / "1.0.0").exists()


@pytest.mark.parametrize("path", ["share/data/big.bin", TABLE])
def test_gzip_of_right_bytes_stays_verified(
    tmp_path: Path, published: dict, hostile: HostileMirror, path: str
) -> None:
    digest = serve_gzip_blob(published, hostile, path, other=False)
    root = tmp_path / "node"
    result = pull(hostile.url, root, published["pki"] / "ca.pem", "1.0.0", False)
    succeeded = result.returncode == 0
    # Decoding the gzip body and verifying it would be as safe as rejecting it.
    assert "Traceback" not in result.stderr
    assert mismatched_blobs(root) == []
    assert blob(root, digest).exists() == succeeded
    assert (root / "store" / "manifests" / "1.0.0").exists() == succeeded


def replace_timestamp_token(hostile: HostileMirror, token: str) -> None:
    hostile.envelope_text = lambda text: text.replace(
        '"timestamp_token": null', f'"timestamp_token": "{token}"'
    )


def test_invalid_base64_timestamp_rejected(
    tmp_path: Path, published: dict, hostile: HostileMirror
) -> None:
    replace_timestamp_token(hostile, "A")
    root = tmp_path / "node"
    result = pull(hostile.url, root, published["pki"] / "ca.pem", "1.0.0", False)
    assert_clean_failure(result, 3)
    assert "timestamp_token is not valid base64" in result.stderr
    assert hostile.blob_requests() == []


@pytest.mark.parametrize("token", ["AAAA", base64.b64encode(b"0" * 64).decode()])
def test_garbage_timestamp_rejected_with_tsa_roots(
    tmp_path: Path, published: dict, hostile: HostileMirror, token: str
) -> None:
    replace_timestamp_token(hostile, token)
    ca = published["pki"] / "ca.pem"
    policy = tmp_path / "policy.toml"
    policy.write_text(f'roots = ["{ca}"]\ntsa_roots = ["{ca}"]\n')
    root = tmp_path / "node"
    result = relman(
        "pull",
        "--mirror",
        hostile.url,
        "--root",
        root,
        "--trust-policy",
        policy,
        "--version",
        "1.0.0",
        check=False,
    )
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("relman pull: timestamp is neither")
    assert len(result.stderr.strip().splitlines()) == 1
    assert hostile.blob_requests() == []


def test_garbage_timestamp_token_rejected(
    tmp_path: Path, published: dict, hostile: HostileMirror
) -> None:
    replace_timestamp_token(hostile, "AAAA")
    root = tmp_path / "node"
    result = pull(hostile.url, root, published["pki"] / "ca.pem", "1.0.0", False)
    assert result.returncode == 3, result.stderr
    assert "timestamp is neither a TimeStampResp nor a TimeStampToken" in result.stderr
    assert not (root / "store" / "manifests" / "1.0.0").exists()


def sign_renamed_release(published: dict, repo: Path, name: str) -> None:
    """Sign version 2.0.0 into ``repo``: the files of 1.0.0, with etc/app.conf renamed to etc/<name>."""
    body = json.loads(
        (published["repo"] / "manifests" / "1.0.0" / "manifest.json").read_bytes()
    )
    body["version"] = "2.0.0"
    for entry in body["files"]:
        if entry["path"] == "etc/app.conf":
            entry["path"] = f"etc/{name}"
    sign_manifest(published["pki"], body, repo / "manifests" / "2.0.0")


@pytest.mark.parametrize("name", ["a" * 256, "\u00e9" * 128, "\u20ac" * 86])
def test_long_path_component_is_rejected(
    tmp_path: Path, published: dict, name: str
) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(published["repo"], repo, symlinks=True)
    sign_renamed_release(published, repo, name)
    server = HostileMirror(repo)
    root = tmp_path / "node"
    try:
        result = pull(server.url, root, published["pki"] / "ca.pem", "2.0.0", False)
    finally:
        server.stop()
    assert_clean_failure(result, 3)
    assert "longer than 255 bytes" in result.stderr
    assert server.blob_requests() == []
    assert not (root / "store" / "manifests" / "2.0.0").exists()


def test_max_path_component_is_deployed(tmp_path: Path, published: dict) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(published["repo"], repo, symlinks=True)
    sign_renamed_release(published, repo, "a" * 255)
    server = HostileMirror(repo)
    root = tmp_path / "node"
    try:
        pull(server.url, root, published["pki"] / "ca.pem", "2.0.0")
    finally:
        server.stop()
    apply(root, "2.0.0")
    assert (root / "current" / "etc" / ("a" * 255)).read_text() == "port = 8080\n"


# Invalid command-line input and node roots.


def test_mirror_without_scheme_is_rejected(tmp_path: Path, published: dict) -> None:
    root = tmp_path / "node"
    result = pull("127.0.0.1:1", root, published["pki"] / "ca.pem", "1.0.0", False)
    assert_clean_failure(result, 1)
    assert "invalid mirror URL" in result.stderr
    assert not root.exists()


def test_status_of_regular_file_fails(tmp_path: Path) -> None:
    regular_file = tmp_path / "not-a-node"
    regular_file.write_text("x\n")
    result = relman("status", "--root", regular_file, check=False)
    assert_clean_failure(result, 1)
    assert "is not a folder" in result.stderr


def test_apply_with_current_folder_fails(node: Path) -> None:
    (node / "current").mkdir()
    result = apply(node, "1.0.0", False)
    assert_clean_failure(result, 1)
    assert "is not a symlink" in result.stderr
    assert (node / "current").is_dir()
    assert not (node / "current").is_symlink()
