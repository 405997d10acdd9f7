"""A node against a real mirror: pull, apply, rollback, status, and attacks on each step."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
from pathlib import Path

import pytest

from tests.support import (
    RELMAN,
    MirrorProcess,
    RelayProxy,
    make_release_tree,
    openssl_sign,
    publish_version,
    relman,
    tree_snapshot,
    wait_for,
)

BIG = 4 * 1024 * 1024


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> dict:
    """A repository with 1.0.0 and 1.1.0; 1.1.0 changes big.bin and app.conf, adds and removes a file."""
    work = tmp_path_factory.mktemp("published")
    pki = work / "pki"
    relman("pki", "init", pki)
    first = make_release_tree(work / "tree-1.0.0", big_size=BIG, seed=1)
    second = work / "tree-1.1.0"
    shutil.copytree(first, second, symlinks=True)
    (second / "share" / "data" / "big.bin").write_bytes(os.urandom(BIG))
    (second / "etc" / "app.conf").write_text("port = 9090\n")
    (second / "share" / "data" / "added.txt").write_text("new in 1.1.0\n")
    (second / "empty.dat").unlink()
    repo = work / "repo"
    publish_version(work, pki, repo, "1.0.0", first)
    publish_version(work, pki, repo, "1.1.0", second)
    return {
        "pki": pki,
        "repo": repo,
        "trees": {"1.0.0": first, "1.1.0": second},
        "work": work,
    }


@pytest.fixture
def repo_copy(tmp_path: Path, published: dict) -> Path:
    """A private copy of the published repository, for tests that damage it."""
    copy = tmp_path / "repo"
    shutil.copytree(published["repo"], copy, symlinks=True)
    return copy


@pytest.fixture
def mirror(published: dict):
    server = MirrorProcess(published["repo"])
    yield server
    server.stop()


@pytest.fixture
def damaged_mirror(repo_copy: Path):
    server = MirrorProcess(repo_copy)
    yield server
    server.stop()


def pull(
    url: str, root: Path, ca: Path, version: str | None = None, check: bool = True
):
    extra = ["--version", version] if version else []
    return relman(
        "pull",
        "--mirror",
        url,
        "--root",
        root,
        "--trust",
        ca,
        "--json",
        *extra,
        check=check,
    )


def apply(root: Path, version: str, check: bool = True, *extra: str):
    return relman(
        "apply", "--root", root, "--version", version, "--json", *extra, check=check
    )


def manifest_files(published: dict, version: str) -> dict[str, dict]:
    body = (published["repo"] / "manifests" / version / "manifest.json").read_bytes()
    return {entry["path"]: entry for entry in json.loads(body)["files"]}


def blob(root: Path, digest: str) -> Path:
    return root / "store" / "objects" / "sha256" / digest[:2] / digest[2:]


def test_pull_latest_fetches_every_blob(
    tmp_path: Path, published: dict, mirror
) -> None:
    root = tmp_path / "node"
    result = json.loads(pull(mirror.url, root, published["pki"] / "ca.pem").stdout)
    files = manifest_files(published, "1.1.0")
    assert result["version"] == "1.1.0"
    assert result["blobs_fetched"] == len(
        {entry["sha256_hash"] for entry in files.values()}
    )
    for entry in files.values():
        assert blob(root, entry["sha256_hash"]).is_file()


def test_apply_builds_tree_from_store(tmp_path: Path, published: dict, mirror) -> None:
    root = tmp_path / "node"
    pull(mirror.url, root, published["pki"] / "ca.pem", "1.0.0")
    result = json.loads(apply(root, "1.0.0").stdout)
    release = root / "releases" / "1.0.0"
    assert result["previous"] is None
    assert os.readlink(root / "current") == "releases/1.0.0"
    assert not (root / "previous").exists()
    for path, entry in manifest_files(published, "1.0.0").items():
        deployed = release / path
        if entry["type"] == "symlink":
            assert os.readlink(deployed) == os.readlink(
                published["trees"]["1.0.0"] / path
            )
            continue
        mode = stat.S_IMODE(deployed.stat().st_mode)
        assert mode == int(entry["permissions"], 8) & ~0o222
        assert hashlib.sha256(deployed.read_bytes()).hexdigest() == entry["sha256_hash"]
        assert deployed.stat().st_nlink >= 2


def test_apply_keeps_one_inode_per_mode(
    tmp_path: Path, published: dict, mirror
) -> None:
    root = tmp_path / "node"
    pull(mirror.url, root, published["pki"] / "ca.pem", "1.0.0")
    apply(root, "1.0.0")
    release = root / "releases" / "1.0.0"
    notes = manifest_files(published, "1.0.0")["share/data/notes.txt"]
    server = manifest_files(published, "1.0.0")["bin/server"]
    assert (release / "share/data/notes.txt").stat().st_ino == blob(
        root, notes["sha256_hash"]
    ).stat().st_ino
    assert (release / "bin/server").stat().st_ino != blob(
        root, server["sha256_hash"]
    ).stat().st_ino
    assert stat.S_IMODE(blob(root, server["sha256_hash"]).stat().st_mode) == 0o444


def test_second_version_fetches_only_changes(
    tmp_path: Path, published: dict, mirror
) -> None:
    root = tmp_path / "node"
    ca = published["pki"] / "ca.pem"
    pull(mirror.url, root, ca, "1.0.0")
    apply(root, "1.0.0")
    result = json.loads(pull(mirror.url, root, ca, "1.1.0").stdout)
    old = manifest_files(published, "1.0.0")
    new = manifest_files(published, "1.1.0")
    old_digests = {entry["sha256_hash"] for entry in old.values()}
    changed = {
        entry["sha256_hash"]: entry["size_bytes"]
        for entry in new.values()
        if entry["sha256_hash"] not in old_digests
    }
    assert result["blobs_fetched"] == len(changed)
    assert result["bytes_received"] == sum(changed.values())
    apply(root, "1.1.0")
    first = root / "releases" / "1.0.0"
    second = root / "releases" / "1.1.0"
    assert (first / "share/data/notes.txt").stat().st_ino == (
        second / "share/data/notes.txt"
    ).stat().st_ino
    assert (first / "bin/server").stat().st_ino == (second / "bin/server").stat().st_ino
    assert (second / "share/data/added.txt").read_text() == "new in 1.1.0\n"
    assert not (second / "empty.dat").exists()
    assert os.readlink(root / "current") == "releases/1.1.0"
    assert os.readlink(root / "previous") == "releases/1.0.0"


def test_rollback_restores_previous_tree(
    tmp_path: Path, published: dict, mirror
) -> None:
    root = tmp_path / "node"
    ca = published["pki"] / "ca.pem"
    for version in ("1.0.0", "1.1.0"):
        pull(mirror.url, root, ca, version)
        apply(root, version)
    first_tree = tree_snapshot(root / "releases" / "1.0.0")
    result = json.loads(relman("rollback", "--root", root, "--json").stdout)
    assert result["version"] == "1.0.0"
    assert os.readlink(root / "current") == "releases/1.0.0"
    assert os.readlink(root / "previous") == "releases/1.1.0"
    assert tree_snapshot(root / "current") == first_tree
    assert (root / "current" / "etc" / "app.conf").read_text() == "port = 8080\n"


def test_rollback_by_id(tmp_path: Path, published: dict, mirror) -> None:
    root = tmp_path / "node"
    ca = published["pki"] / "ca.pem"
    pull(mirror.url, root, ca, "1.0.0")
    apply(root, "1.0.0")
    pull(mirror.url, root, ca, "1.1.0")
    rollback_id = json.loads(apply(root, "1.1.0").stdout)["rollback_id"]
    result = json.loads(
        relman("rollback", "--root", root, "--id", rollback_id, "--json").stdout
    )
    assert result["version"] == "1.0.0"
    assert os.readlink(root / "current") == "releases/1.0.0"


def test_rollback_without_previous_fails(
    tmp_path: Path, published: dict, mirror
) -> None:
    root = tmp_path / "node"
    pull(mirror.url, root, published["pki"] / "ca.pem", "1.0.0")
    apply(root, "1.0.0")
    result = relman("rollback", "--root", root, check=False)
    assert result.returncode == 1
    assert "no previous release" in result.stderr
    assert os.readlink(root / "current") == "releases/1.0.0"


def test_status_reports_links(tmp_path: Path, published: dict, mirror) -> None:
    root = tmp_path / "node"
    ca = published["pki"] / "ca.pem"
    for version in ("1.0.0", "1.1.0"):
        pull(mirror.url, root, ca, version)
        apply(root, version)
    report = json.loads(relman("status", "--root", root, "--json").stdout)
    text = relman("status", "--root", root).stdout
    assert report["current"] == "1.1.0"
    assert report["previous"] == "1.0.0"
    assert report["releases"] == ["1.0.0", "1.1.0"]
    assert report["pulled"] == ["1.0.0", "1.1.0"]
    assert [row["version"] for row in report["deployments"]] == ["1.1.0", "1.0.0"]
    assert "current:  1.1.0" in text
    assert "previous: 1.0.0" in text


def test_apply_rejects_downgrade(tmp_path: Path, published: dict, mirror) -> None:
    root = tmp_path / "node"
    ca = published["pki"] / "ca.pem"
    for version in ("1.0.0", "1.1.0"):
        pull(mirror.url, root, ca, version)
    apply(root, "1.1.0")
    result = apply(root, "1.0.0", False)
    assert result.returncode == 1
    assert "lower than the current 1.1.0" in result.stderr
    assert os.readlink(root / "current") == "releases/1.1.0"
    apply(root, "1.0.0", True, "--allow-downgrade")
    assert os.readlink(root / "current") == "releases/1.0.0"


def test_apply_requires_pulled_version(tmp_path: Path, published: dict, mirror) -> None:
    root = tmp_path / "node"
    pull(mirror.url, root, published["pki"] / "ca.pem", "1.0.0")
    result = apply(root, "1.1.0", False)
    assert result.returncode == 1
    assert "--version 1.1.0` first" in result.stderr
    assert not (root / "releases" / "1.1.0").exists()


def test_tampered_blob_is_rejected(
    tmp_path: Path, published: dict, repo_copy: Path, damaged_mirror
) -> None:
    root = tmp_path / "node"
    ca = published["pki"] / "ca.pem"
    pull(damaged_mirror.url, root, ca, "1.0.0")
    apply(root, "1.0.0")
    digest = manifest_files(published, "1.1.0")["etc/app.conf"]["sha256_hash"]
    target = repo_copy / "objects" / "sha256" / digest[:2] / digest[2:]
    os.chmod(target, 0o644)
    target.write_bytes(b"port = 6666\n")
    before = tree_snapshot(root / "releases")
    result = pull(damaged_mirror.url, root, ca, "1.1.0", check=False)
    assert result.returncode == 3
    assert "does not match the manifest" in result.stderr
    assert not blob(root, digest).exists()
    assert not (root / "store" / "manifests" / "1.1.0").exists()
    assert os.readlink(root / "current") == "releases/1.0.0"
    assert tree_snapshot(root / "releases") == before


def test_oversized_blob_is_cut(
    tmp_path: Path, published: dict, repo_copy: Path, damaged_mirror
) -> None:
    root = tmp_path / "node"
    digest = manifest_files(published, "1.0.0")["etc/app.conf"]["sha256_hash"]
    target = repo_copy / "objects" / "sha256" / digest[:2] / digest[2:]
    os.chmod(target, 0o644)
    target.write_bytes(b"port = 8080\n" * 100000)
    result = pull(
        damaged_mirror.url, root, published["pki"] / "ca.pem", "1.0.0", check=False
    )
    assert result.returncode == 3
    assert "more than the declared 12 bytes" in result.stderr
    assert not blob(root, digest).exists()


def test_altered_manifest_fetches_no_blob(
    tmp_path: Path, published: dict, repo_copy: Path
) -> None:
    manifest = repo_copy / "manifests" / "1.0.0" / "manifest.json"
    manifest.write_bytes(manifest.read_bytes().replace(b'"v1.0.0"', b'"v6.6.6"'))
    server = MirrorProcess(repo_copy)
    proxy = RelayProxy(server.port)
    root = tmp_path / "node"
    try:
        result = pull(
            proxy.url, root, published["pki"] / "ca.pem", "1.0.0", check=False
        )
    finally:
        proxy.stop()
        server.stop()
    assert result.returncode == 3
    assert "does not cover this manifest" in result.stderr
    assert not any(b"GET /objects/" in request for request in proxy.requests)
    assert not any((root / "store" / "objects" / "sha256").iterdir())
    assert not (root / "current").exists()


def test_untrusted_signer_is_rejected(tmp_path: Path, published: dict, mirror) -> None:
    other = tmp_path / "other-pki"
    relman("pki", "init", other)
    root = tmp_path / "node"
    result = pull(mirror.url, root, other / "ca.pem", "1.0.0", check=False)
    assert result.returncode == 3
    assert "does not reach a trusted root" in result.stderr
    assert not (root / "store" / "manifests" / "1.0.0").exists()


def test_missing_version_names_it(tmp_path: Path, published: dict, mirror) -> None:
    result = pull(
        mirror.url, tmp_path / "node", published["pki"] / "ca.pem", "9.9.9", check=False
    )
    assert result.returncode == 1
    assert "HTTP 404" in result.stderr
    assert "9.9.9" in result.stderr


def test_cut_download_resumes(tmp_path: Path, published: dict, mirror) -> None:
    proxy = RelayProxy(mirror.port, cut_after=BIG // 2)
    root = tmp_path / "node"
    try:
        result = json.loads(
            relman(
                "pull",
                "--mirror",
                proxy.url,
                "--root",
                root,
                "--trust",
                published["pki"] / "ca.pem",
                "--version",
                "1.0.0",
                "--concurrency",
                "1",
                "--json",
            ).stdout
        )
    finally:
        proxy.stop()
    release_size = sum(
        entry["size_bytes"]
        for entry in {
            e["sha256_hash"]: e for e in manifest_files(published, "1.0.0").values()
        }.values()
    )
    assert result["resumed"] == 1
    assert result["retries"] == 1
    assert result["bytes_received"] == release_size
    # Headers cost a few hundred bytes per response; a restart from zero would cost BIG // 2 more.
    assert proxy.response_bytes < release_size + 64 * 1024


def test_killed_pull_resumes(tmp_path: Path, published: dict, mirror) -> None:
    proxy = RelayProxy(mirror.port, delay_per_chunk=0.01)
    root = tmp_path / "node"
    ca = published["pki"] / "ca.pem"
    partial = root / "store" / "tmp" / "partial"
    process = subprocess.Popen(
        [
            *RELMAN,
            "pull",
            "--mirror",
            proxy.url,
            "--root",
            str(root),
            "--trust",
            str(ca),
            "--version",
            "1.0.0",
            "--concurrency",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(
            lambda: (
                partial.is_dir()
                and any(
                    path.stat().st_size > BIG // 4
                    for path in partial.iterdir()
                    if not path.name.endswith(".etag")
                )
            )
        )
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        sent_before = proxy.response_bytes
        proxy.delay_per_chunk = 0
        result = json.loads(pull(proxy.url, root, ca, "1.0.0").stdout)
    finally:
        proxy.stop()
        if process.poll() is None:
            process.kill()
    assert process.returncode == -signal.SIGKILL
    assert result["resumed"] == 1
    assert result["bytes_received"] < sum(
        entry["size_bytes"] for entry in manifest_files(published, "1.0.0").values()
    )
    assert proxy.response_bytes - sent_before < BIG
    apply(root, "1.0.0")
    big = manifest_files(published, "1.0.0")["share/data/big.bin"]
    assert (
        hashlib.sha256(
            (root / "current" / "share/data/big.bin").read_bytes()
        ).hexdigest()
        == big["sha256_hash"]
    )


def test_apply_rejects_unsafe_manifest_path(
    tmp_path: Path, published: dict, mirror
) -> None:
    root = tmp_path / "node"
    ca = published["pki"] / "ca.pem"
    pki = published["pki"]
    pull(mirror.url, root, ca, "1.0.0")
    apply(root, "1.0.0")
    for version, path in (("1.2.0", "../x"), ("1.3.0", "/etc/x")):
        body = json.loads(
            (published["repo"] / "manifests" / "1.0.0" / "manifest.json").read_bytes()
        )
        body["version"] = version
        body["files"][0]["path"] = path
        folder = root / "store" / "manifests" / version
        folder.mkdir(parents=True)
        from relman.cas.canonical import canonical_bytes

        (folder / "manifest.json").write_bytes(canonical_bytes(body))
        relman(
            "sign",
            "--manifest",
            folder / "manifest.json",
            "--key",
            pki / "signer.key",
            "--cert",
            pki / "signer.pem",
            check=False,
        )
        openssl_sign(
            folder / "manifest.json", pki / "signer.pem", pki / "signer.key", check=True
        )
        before = tree_snapshot(root / "releases"), os.readlink(root / "current")
        result = apply(root, version, False, "--trust", str(ca))
        assert result.returncode == 3
        assert f"unsafe path {path!r}" in result.stderr
        assert (
            tree_snapshot(root / "releases"),
            os.readlink(root / "current"),
        ) == before
        assert not (tmp_path / "x").exists()
