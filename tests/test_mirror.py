"""relman serve: repository files, byte ranges, conditional requests and the update API.

Every test talks HTTP to a real ``relman serve`` subprocess on 127.0.0.1,
over a repository built with the real CLI.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import random
import re
import signal
import socket
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from relman.cas.canonical import canonical_bytes
from relman.cas.errors import InputError
from relman.cas.repository import Repository
from relman.mirror.app import start_mirror, stop_mirror
from tests import support
from tests.support import MirrorProcess as Server
from tests.support import relman_publish, relman_sign

RELMAN = support.RELMAN
BIG_SIZE = 700_000  # spans several 256 KiB chunks of the server
CHUNK = 256 * 1024
IMMUTABLE = "public, max-age=31536000, immutable"
ENVELOPE_KEYS = ("manifest_hash", "signature", "signing_certificate", "timestamp_token")
EMPTY_DIGEST = hashlib.sha256(b"").hexdigest()


# Helpers.


def relman(*arguments: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    """Run the real relman CLI and fail the test when it exits non-zero."""
    return support.relman(*arguments)


def run_relman(*arguments: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    return support.relman(*arguments, check=False)


def write_tree(folder: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return folder


def publish(
    work: Path,
    pki: Path,
    repo: Path,
    version: str,
    files: dict[str, bytes],
    *flags: str,
) -> Path:
    """Publish ``files`` as ``version`` with the CLI and return the release tree."""
    tree = write_tree(work / f"release-{version}", files)
    manifest = work / f"manifest-{version}.json"
    relman(
        "generate",
        "--version",
        version,
        "--release-dir",
        tree,
        "--output",
        manifest,
        "--release-date",
        "2026-03-01T12:00:00Z",
        *flags,
    )
    relman_sign(manifest, pki)
    relman_publish(repo, manifest, tree, "--trust", pki / "ca.pem")
    return tree


def blob_path(digest: str) -> str:
    return f"/objects/sha256/{digest[:2]}/{digest[2:]}"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def start_server(repo: Path, log_folder: Path, *flags: str) -> Server:
    """Start ``relman serve --port 0`` and read the port from its first line."""
    return Server(repo, log_folder, *flags)


def stop_process(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    if process.stdout is not None:
        process.stdout.close()


# Fixtures.


@dataclass
class Published:
    repo: Path
    pki: Path
    files: dict[str, bytes]


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory, pki: Path) -> Published:
    """A repository with 1.0.0 and a critical 1.1.0, and private files to hide."""
    work = tmp_path_factory.mktemp("published")
    repo = work / "repo"
    files = {
        "big.bin": random.Random(7).randbytes(BIG_SIZE),
        "small.txt": b"hello mirror\n",
        "empty.dat": b"",
    }
    publish(work, pki, repo, "1.0.0", files)
    changed = {**files, "small.txt": b"hello again\n"}
    publish(work, pki, repo, "1.1.0", changed, "--critical")

    (repo / "tmp").mkdir(exist_ok=True)
    (repo / "tmp" / "leak.bin").write_bytes(b"unverified")
    (repo / "index.json.sig").write_bytes(b"catalog signature")
    outside = work / "outside.txt"
    outside.write_bytes(b"outside the repository")
    links = repo / "objects" / "sha256" / "ff"
    links.mkdir(exist_ok=True)
    os.symlink(outside, links / ("f" * 62))
    (repo / "crls").mkdir()
    (repo / "crls" / "root.crl").write_bytes(b"a certificate revocation list")
    (repo / "crls" / "notes.txt").write_bytes(b"not a CRL")
    os.symlink("../../../index.sqlite", links / ("e" * 62))
    return Published(repo, pki, files)


@pytest.fixture(scope="module")
def server(
    published: Published, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    running = start_server(published.repo, tmp_path_factory.mktemp("logs"))
    yield running
    stop_process(running.process)


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Start servers for one test; every one still running is killed afterwards."""
    started: list[Server] = []

    def start(repo: Path, *flags: str) -> Server:
        running = start_server(repo, tmp_path, *flags)
        started.append(running)
        return running

    yield start
    for running in started:
        stop_process(running.process)


@pytest.fixture(scope="module")
def big(published: Published) -> bytes:
    return published.files["big.bin"]


@pytest.fixture(scope="module")
def big_url(big: bytes) -> str:
    return blob_path(sha256(big))


# Whole files.


def test_blob_get_full(server: Server, big: bytes, big_url: str) -> None:
    reply = server.request(big_url)
    assert reply.status == 200
    assert reply.body == big
    assert reply.headers["Content-Length"] == str(BIG_SIZE)
    assert reply.headers["Content-Type"] == "application/octet-stream"
    assert reply.headers["Cache-Control"] == IMMUTABLE
    assert reply.headers["Accept-Ranges"] == "bytes"


def test_blob_etag_is_digest(server: Server, big: bytes, big_url: str) -> None:
    reply = server.request(big_url)
    assert reply.headers["ETag"] == f'"{sha256(big)}"'


def test_blob_head(server: Server, big: bytes, big_url: str) -> None:
    reply = server.request(big_url, method="HEAD")
    assert reply.status == 200
    assert reply.body == b""
    assert reply.headers["Content-Length"] == str(BIG_SIZE)
    assert reply.headers["ETag"] == f'"{sha256(big)}"'
    assert reply.headers["Accept-Ranges"] == "bytes"


def test_blob_empty(server: Server) -> None:
    reply = server.request(blob_path(EMPTY_DIGEST))
    assert reply.status == 200
    assert reply.body == b""
    assert reply.headers["Content-Length"] == "0"


def test_index_etag_is_sha256(server: Server, published: Published) -> None:
    reply = server.request("/index.json")
    data = (published.repo / "index.json").read_bytes()
    assert reply.status == 200
    assert reply.body == data
    assert reply.headers["ETag"] == f'"{sha256(data)}"'
    assert reply.headers["Cache-Control"] == "no-cache"
    assert reply.headers["Content-Type"] == "application/json"


def test_config_served(server: Server, published: Published) -> None:
    reply = server.request("/config.json")
    data = (published.repo / "config.json").read_bytes()
    assert reply.status == 200
    assert reply.body == data
    assert reply.headers["ETag"] == f'"{sha256(data)}"'
    assert reply.headers["Cache-Control"] == "no-cache"


def test_index_signature_served(server: Server) -> None:
    reply = server.request("/index.json.sig")
    assert reply.status == 200
    assert reply.body == b"catalog signature"
    assert reply.headers["Content-Type"] == "application/octet-stream"
    assert reply.headers["Cache-Control"] == "no-cache"


def test_manifest_files_served(server: Server, published: Published) -> None:
    folder = published.repo / "manifests" / "1.0.0"
    manifest = server.request("/manifests/1.0.0/manifest.json")
    signature = server.request("/manifests/1.0.0/manifest.json.sig")
    assert manifest.status == 200
    assert manifest.body == (folder / "manifest.json").read_bytes()
    assert manifest.headers["Content-Type"] == "application/json"
    assert manifest.headers["Cache-Control"] == IMMUTABLE
    assert manifest.headers["ETag"] == f'"{sha256(manifest.body)}"'
    assert signature.status == 200
    assert signature.body == (folder / "manifest.json.sig").read_bytes()
    assert signature.headers["Content-Type"] == "application/octet-stream"
    assert signature.headers["Cache-Control"] == IMMUTABLE


def test_healthz(server: Server) -> None:
    reply = server.request("/healthz")
    assert reply.status == 200
    assert reply.json() == {"status": "ok"}


# Byte ranges.


@pytest.mark.parametrize(
    ("header", "first", "last"),
    [
        ("bytes=10-19", 10, 19),
        ("bytes=0-0", 0, 0),
        (f"bytes={BIG_SIZE - 5}-", BIG_SIZE - 5, BIG_SIZE - 1),
        ("bytes=-7", BIG_SIZE - 7, BIG_SIZE - 1),
        (f"bytes={CHUNK - 4}-{CHUNK + 4}", CHUNK - 4, CHUNK + 4),
        ("bytes=100000-600000", 100000, 600000),
        ("bytes=5-99999999", 5, BIG_SIZE - 1),
        ("bytes=-99999999", 0, BIG_SIZE - 1),
        ("BYTES=1-2", 1, 2),
        ("bytes=0-1,", 0, 1),
        ("bytes=0-" + "9" * 5000, 0, BIG_SIZE - 1),
    ],
)
def test_range_partial(
    server: Server, big: bytes, big_url: str, header: str, first: int, last: int
) -> None:
    reply = server.request(big_url, headers={"Range": header})
    assert reply.status == 206
    assert reply.body == big[first : last + 1]
    assert reply.headers["Content-Range"] == f"bytes {first}-{last}/{BIG_SIZE}"
    assert reply.headers["Content-Length"] == str(last - first + 1)
    assert reply.headers["ETag"] == f'"{sha256(big)}"'
    assert reply.headers["Content-Type"] == "application/octet-stream"


@pytest.mark.parametrize(
    "header",
    [
        f"bytes={BIG_SIZE}-",
        f"bytes={BIG_SIZE + 10}-{BIG_SIZE + 20}",
        "bytes=-0",
        "bytes=" + "9" * 5000 + "-",
    ],
)
def test_range_unsatisfiable(server: Server, big_url: str, header: str) -> None:
    reply = server.request(big_url, headers={"Range": header})
    assert reply.status == 416
    assert reply.headers["Content-Range"] == f"bytes */{BIG_SIZE}"
    assert reply.body == b""


def test_range_empty_blob_416(server: Server) -> None:
    reply = server.request(blob_path(EMPTY_DIGEST), headers={"Range": "bytes=0-"})
    assert reply.status == 416
    assert reply.headers["Content-Range"] == "bytes */0"


@pytest.mark.parametrize(
    "header",
    [
        "bytes=abc",
        "bytes=5-2",
        "items=0-5",
        "bytes=0-1,4-5",
        "bytes = 0-1",
        "bytes=",
        "bytes=--1",
        "bytes=1-2-3",
        "0-5",
    ],
)
def test_range_malformed_ignored(
    server: Server, big: bytes, big_url: str, header: str
) -> None:
    reply = server.request(big_url, headers={"Range": header})
    assert reply.status == 200
    assert reply.body == big
    assert "Content-Range" not in reply.headers


def test_range_head_ignored(server: Server, big_url: str) -> None:
    reply = server.request(big_url, method="HEAD", headers={"Range": "bytes=0-9"})
    assert reply.status == 200
    assert reply.headers["Content-Length"] == str(BIG_SIZE)


def test_range_small_file(server: Server) -> None:
    path = "/manifests/1.0.0/manifest.json"
    reply = server.request(path, headers={"Range": "bytes=0-0"})
    assert reply.status == 206
    assert reply.body == b"{"
    assert reply.headers["Content-Type"] == "application/json"


# Conditional requests.


def test_if_range_match(server: Server, big: bytes, big_url: str) -> None:
    headers = {"Range": "bytes=0-9", "If-Range": f'"{sha256(big)}"'}
    reply = server.request(big_url, headers=headers)
    assert reply.status == 206
    assert reply.body == big[:10]


@pytest.mark.parametrize(
    "validator",
    [
        '"0000"',
        "W/{etag}",
        "Fri, 01 Jan 2100 00:00:00 GMT",
        "{etag}, {etag}",
    ],
)
def test_if_range_mismatch(
    server: Server, big: bytes, big_url: str, validator: str
) -> None:
    etag = f'"{sha256(big)}"'
    headers = {"Range": "bytes=0-9", "If-Range": validator.format(etag=etag)}
    reply = server.request(big_url, headers=headers)
    assert reply.status == 200
    assert reply.body == big


def test_if_range_without_range(server: Server, big: bytes, big_url: str) -> None:
    reply = server.request(big_url, headers={"If-Range": '"0000"'})
    assert reply.status == 200
    assert reply.body == big


@pytest.mark.parametrize("validator", ["{etag}", "W/{etag}", '"0000", {etag}', "*"])
def test_if_none_match_304(
    server: Server, big: bytes, big_url: str, validator: str
) -> None:
    etag = f'"{sha256(big)}"'
    headers = {"If-None-Match": validator.format(etag=etag)}
    reply = server.request(big_url, headers=headers)
    assert reply.status == 304
    assert reply.body == b""
    assert reply.headers["ETag"] == etag
    assert reply.headers["Cache-Control"] == IMMUTABLE


def test_if_none_match_head_304(server: Server, big: bytes, big_url: str) -> None:
    headers = {"If-None-Match": f'"{sha256(big)}"'}
    reply = server.request(big_url, method="HEAD", headers=headers)
    assert reply.status == 304


def test_if_none_match_differs(server: Server, big: bytes, big_url: str) -> None:
    reply = server.request(big_url, headers={"If-None-Match": '"0000"'})
    assert reply.status == 200
    assert reply.body == big


def test_if_none_match_before_range(server: Server, big: bytes, big_url: str) -> None:
    headers = {"If-None-Match": f'"{sha256(big)}"', "Range": "bytes=0-9"}
    reply = server.request(big_url, headers=headers)
    assert reply.status == 304


def test_if_none_match_index(server: Server, published: Published) -> None:
    etag = f'"{sha256((published.repo / "index.json").read_bytes())}"'
    reply = server.request("/index.json", headers={"If-None-Match": etag})
    assert reply.status == 304
    assert reply.headers["Cache-Control"] == "no-cache"


# Paths that are not served.


@pytest.mark.parametrize(
    "path",
    [
        "/index.sqlite",
        "/.lock",
        "/tmp/",
        "/tmp/leak.bin",
        "/objects/../index.sqlite",
        "/../index.sqlite",
        "/manifests/1.0.0/../../index.sqlite",
        "/%2e%2e/index.sqlite",
        "/objects/sha256/..%2f..%2findex.sqlite",
        "/nothing",
        "/",
        "/objects/sha256/",
        "/manifests/1.0.0/",
        "/manifests/1.0.0/other.json",
        "/manifests/1.0/manifest.json",
        "/manifests/1.0.0/manifest.json.tsr",
        "/index.json/",
        "/INDEX.JSON",
        blob_path(EMPTY_DIGEST.upper()),
        blob_path("0" * 64),
        "/objects/sha256/ff/" + "f" * 62,
        "/objects/sha256/ff/" + "e" * 62,
        "/api/updates",
    ],
)
def test_path_not_served(server: Server, path: str) -> None:
    reply = server.request(path)
    assert reply.status == 404


def test_private_files_exist(published: Published) -> None:
    """The 404s above come from the path checks: these files are on disk."""
    assert (published.repo / "index.sqlite").is_file()
    assert (published.repo / ".lock").is_file()
    assert (published.repo / "tmp" / "leak.bin").is_file()
    links = published.repo / "objects" / "sha256" / "ff"
    assert (links / ("f" * 62)).read_bytes() == b"outside the repository"
    assert (links / ("e" * 62)).is_file()


def test_method_not_allowed(server: Server) -> None:
    reply = server.request("/index.json", method="POST")
    assert reply.status == 405


# Update API.


def test_api_list(server: Server, published: Published) -> None:
    reply = server.request("/api/updates/manifests")
    folder = published.repo / "manifests"
    hashes = {
        version: sha256((folder / version / "manifest.json").read_bytes())
        for version in ("1.0.0", "1.1.0")
    }
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("application/json")
    assert reply.json() == {
        "versions": [
            {
                "version": "1.0.0",
                "manifest_hash": hashes["1.0.0"],
                "release_date": "2026-03-01T12:00:00Z",
                "is_critical": False,
            },
            {
                "version": "1.1.0",
                "manifest_hash": hashes["1.1.0"],
                "release_date": "2026-03-01T12:00:00Z",
                "is_critical": True,
            },
        ],
        "latest": "1.1.0",
    }


def test_api_latest(server: Server, published: Published) -> None:
    latest = server.request("/api/updates/manifests/latest")
    direct = server.request("/api/updates/manifests/1.1.0")
    assert latest.status == 200
    assert latest.json()["version"] == "1.1.0"
    assert latest.json() == direct.json()


def test_api_envelope_hash(server: Server, published: Published) -> None:
    envelope = server.request("/api/updates/manifests/1.0.0").json()
    body = (published.repo / "manifests" / "1.0.0" / "manifest.json").read_bytes()
    assert envelope["manifest_hash"] == sha256(body)


def test_api_envelope_canonical(server: Server, published: Published) -> None:
    envelope = server.request("/api/updates/manifests/1.0.0").json()
    body = (published.repo / "manifests" / "1.0.0" / "manifest.json").read_bytes()
    for key in ENVELOPE_KEYS:
        del envelope[key]
    assert canonical_bytes(envelope) == body


def test_api_envelope_signature(server: Server, published: Published) -> None:
    envelope = server.request("/api/updates/manifests/1.0.0").json()
    folder = published.repo / "manifests" / "1.0.0"
    signer = (published.pki / "signer.pem").read_text()
    signature = (folder / "manifest.json.sig").read_bytes()
    assert base64.b64decode(envelope["signature"]) == signature
    assert envelope["signing_certificate"].startswith("-----BEGIN CERTIFICATE-----")
    assert envelope["signing_certificate"].strip() in signer
    assert envelope["timestamp_token"] is None


def test_api_missing_404(server: Server) -> None:
    reply = server.request("/api/updates/manifests/9.9.9")
    assert reply.status == 404
    assert reply.headers["Content-Type"].startswith("application/json")
    assert reply.json() == {
        "error": "manifest not found for version 9.9.9",
        "version": "9.9.9",
    }


@pytest.mark.parametrize("version", ["1.0", "v1.0.0", "1.0.0..", "%2e%2e"])
def test_api_invalid_400(server: Server, version: str) -> None:
    reply = server.request(f"/api/updates/manifests/{version}")
    body = reply.json()
    assert reply.status == 400
    assert body["version"] == version.replace("%2e", ".")
    assert body["error"].startswith("invalid version")


def test_api_empty_repository(spawn: Callable[..., Server], tmp_path: Path) -> None:
    repo = tmp_path / "empty"
    Repository.create(repo)
    running = spawn(repo)
    listing = running.request("/api/updates/manifests")
    latest = running.request("/api/updates/manifests/latest")
    assert listing.status == 200
    assert listing.json() == {"versions": [], "latest": None}
    assert latest.status == 404
    assert latest.headers["Content-Type"].startswith("application/json")
    assert "error" in latest.json()


def test_api_invalid_stored_manifest(
    spawn: Callable[..., Server], tmp_path: Path, pki: Path
) -> None:
    repo = tmp_path / "repo"
    publish(tmp_path, pki, repo, "1.0.0", {"a.txt": b"one\n"})
    broken = repo / "manifests" / "2.0.0"
    broken.mkdir()
    (broken / "manifest.json").write_bytes(b"{not json")
    (broken / "manifest.json.sig").write_bytes(b"signature")
    running = spawn(repo)

    listing = running.request("/api/updates/manifests")
    latest = running.request("/api/updates/manifests/latest")
    direct = running.request("/api/updates/manifests/2.0.0")

    assert listing.status == 200
    assert [entry["version"] for entry in listing.json()["versions"]] == ["1.0.0"]
    assert listing.json()["latest"] == "1.0.0"
    assert latest.status == 200
    assert latest.json()["version"] == "1.0.0"
    assert direct.status == 500
    assert direct.json()["version"] == "2.0.0"
    assert direct.json()["error"].startswith("stored manifest is invalid")
    assert running.stderr().count("leaving version 2.0.0 out of") == 1
    assert "failed to send /api/updates/manifests/2.0.0" in running.stderr()


def test_api_sees_new_publish(
    spawn: Callable[..., Server], tmp_path: Path, pki: Path
) -> None:
    repo = tmp_path / "repo"
    publish(tmp_path, pki, repo, "1.0.0", {"a.txt": b"one\n"})
    running = spawn(repo)
    before = running.request("/api/updates/manifests").json()

    publish(tmp_path, pki, repo, "2.0.0", {"a.txt": b"two\n"})
    after = running.request("/api/updates/manifests").json()
    latest = running.request("/api/updates/manifests/latest").json()
    blob = running.request(blob_path(sha256(b"two\n")))

    assert before["latest"] == "1.0.0"
    assert after["latest"] == "2.0.0"
    assert [entry["version"] for entry in after["versions"]] == ["1.0.0", "2.0.0"]
    assert latest["version"] == "2.0.0"
    assert blob.status == 200
    assert blob.body == b"two\n"


# The serve command.


def test_serve_not_repository(tmp_path: Path) -> None:
    missing = tmp_path / "not-a-repo"
    completed = run_relman("serve", "--repo", missing, "--port", "0")
    assert completed.returncode == 1
    assert str(missing) in completed.stderr
    assert completed.stdout == ""


def test_serve_repo_is_file(tmp_path: Path) -> None:
    regular_file = tmp_path / "file"
    regular_file.write_bytes(b"not a folder")
    completed = run_relman("serve", "--repo", regular_file, "--port", "0")
    assert completed.returncode == 1
    assert str(regular_file) in completed.stderr
    assert "Traceback" not in completed.stderr


def test_serve_port_in_use(tmp_path: Path, published: Published) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        completed = run_relman("serve", "--repo", published.repo, "--port", str(port))
    assert completed.returncode == 1
    assert "cannot listen on 127.0.0.1 port" in completed.stderr


def test_serve_invalid_port(published: Published) -> None:
    completed = run_relman("serve", "--repo", published.repo, "--port", "70000")
    assert completed.returncode == 2
    assert "invalid port '70000'" in completed.stderr


@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGINT])
def test_serve_stops_on_signal(
    spawn: Callable[..., Server], published: Published, number: signal.Signals
) -> None:
    running = spawn(published.repo, "-v")
    assert running.request("/healthz").status == 200

    os.kill(running.process.pid, number)
    returncode = running.process.wait(timeout=30)
    remaining = running.process.stdout.read()

    assert returncode == 0
    assert remaining == ""
    assert f"received {number.name}, stopping the mirror" in running.stderr()
    assert "mirror stopped on http://127.0.0.1:" in running.stderr()


# In-process use.


async def fetch_in_process(repo: Path, path: str) -> tuple[int, bytes]:
    runner, port = await start_mirror(repo, "127.0.0.1", 0)
    try:
        url = f"http://127.0.0.1:{port}{path}"
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            return response.status, await response.read()
    finally:
        await stop_mirror(runner)


def test_start_mirror_in_process(published: Published) -> None:
    status, body = asyncio.run(fetch_in_process(published.repo, "/config.json"))
    assert status == 200
    assert body == (published.repo / "config.json").read_bytes()


def test_start_mirror_not_repository(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=re.escape(str(tmp_path))):
        asyncio.run(fetch_in_process(tmp_path, "/healthz"))


def test_crl_served_without_caching(server: Server) -> None:
    reply = server.request("/crls/root.crl")
    assert reply.status == 200
    assert reply.body == b"a certificate revocation list"
    assert reply.headers["Cache-Control"] == "no-cache"
    assert reply.headers["ETag"] == f'"{sha256(reply.body)}"'


@pytest.mark.parametrize(
    "path",
    ["/crls/notes.txt", "/crls/.root.crl", "/crls/../index.sqlite", "/crls/a/root.crl"],
)
def test_crl_folder_serves_only_crls(server: Server, path: str) -> None:
    assert server.request(path).status == 404
