"""relman publish: blobs, index, idempotence and rejected publishes."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

import pytest

from tests.support import (
    make_release_tree,
    relman,
    relman_publish,
    relman_sign,
    tree_snapshot,
)


@pytest.fixture
def signed(tmp_path: Path, pki: Path) -> tuple[Path, Path]:
    tree = make_release_tree(tmp_path / "release", big_size=256 * 1024)
    manifest = tmp_path / "manifest.json"
    relman(
        "generate", "--version", "1.0.0", "--release-dir", tree, "--output", manifest
    )
    relman_sign(manifest, pki)
    return tree, manifest


def publish(repo: Path, manifest: Path, tree: Path, pki: Path, check: bool = True):
    return relman_publish(
        repo, manifest, tree, "--trust", pki / "ca.pem", "--json", check=check
    )


def test_publish_stores_blobs(tmp_path: Path, pki: Path, signed) -> None:
    tree, manifest = signed
    repo = tmp_path / "repo"
    publish(repo, manifest, tree, pki)
    for entry in json.loads(manifest.read_bytes())["files"]:
        digest = entry["sha256_hash"]
        blob = repo / "objects" / "sha256" / digest[:2] / digest[2:]
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == digest
        assert blob.stat().st_mode & 0o777 == 0o444
    assert (
        repo / "manifests" / "1.0.0" / "manifest.json"
    ).read_bytes() == manifest.read_bytes()
    assert (repo / "manifests" / "1.0.0" / "manifest.json.sig").read_bytes() == Path(
        f"{manifest}.sig"
    ).read_bytes()
    assert json.loads((repo / "config.json").read_bytes()) == {
        "format": "relman-repository",
        "version": 1,
    }


def test_publish_records_index(tmp_path: Path, pki: Path, signed) -> None:
    tree, manifest = signed
    repo = tmp_path / "repo"
    publish(repo, manifest, tree, pki)
    database = sqlite3.connect(repo / "index.sqlite")
    releases = database.execute(
        "select version, manifest_hash, file_count from release_manifests"
    ).fetchall()
    files = database.execute(
        "select path, version, sha256_hash from file_registry order by path"
    ).fetchall()
    tables = {
        row[0]
        for row in database.execute(
            "select name from sqlite_master where type = 'table'"
        )
    }
    expected = json.loads(manifest.read_bytes())["files"]
    assert releases == [
        ("1.0.0", hashlib.sha256(manifest.read_bytes()).hexdigest(), len(expected))
    ]
    assert files == [
        (entry["path"], "1.0.0", entry["sha256_hash"]) for entry in expected
    ]
    assert {
        "release_manifests",
        "file_registry",
        "signature_cache",
        "download_cache",
    } <= tables


def test_publish_writes_catalog(tmp_path: Path, pki: Path, signed) -> None:
    tree, manifest = signed
    repo = tmp_path / "repo"
    publish(repo, manifest, tree, pki)
    catalog = json.loads((repo / "index.json").read_bytes())
    assert catalog["sequence"] == 1
    assert [item["version"] for item in catalog["versions"]] == ["1.0.0"]
    assert (
        catalog["versions"][0]["manifest_hash"]
        == hashlib.sha256(manifest.read_bytes()).hexdigest()
    )


def test_publish_twice_is_noop(tmp_path: Path, pki: Path, signed) -> None:
    tree, manifest = signed
    repo = tmp_path / "repo"
    publish(repo, manifest, tree, pki)
    before = (
        tree_snapshot(repo / "objects"),
        tree_snapshot(repo / "manifests"),
        (repo / "index.json").read_bytes(),
    )
    result = json.loads(publish(repo, manifest, tree, pki).stdout)
    after = (
        tree_snapshot(repo / "objects"),
        tree_snapshot(repo / "manifests"),
        (repo / "index.json").read_bytes(),
    )
    assert result["created"] is False
    assert result["bytes_copied"] == 0
    assert after == before


def test_publish_rejects_other_content(tmp_path: Path, pki: Path, signed) -> None:
    tree, manifest = signed
    repo = tmp_path / "repo"
    publish(repo, manifest, tree, pki)
    (tree / "etc" / "app.conf").write_text("port = 9090\n")
    other = tmp_path / "other.json"
    relman("generate", "--version", "1.0.0", "--release-dir", tree, "--output", other)
    relman_sign(other, pki)
    before = tree_snapshot(repo)
    result = publish(repo, other, tree, pki, check=False)
    assert result.returncode == 1
    assert "version 1.0.0 is already published" in result.stderr
    assert tree_snapshot(repo) == before


def test_publish_rejects_file_changed_after_generate(
    tmp_path: Path, pki: Path, signed
) -> None:
    tree, manifest = signed
    repo = tmp_path / "repo"
    (tree / "share" / "data" / "notes.txt").write_text("edited after generate\n")
    result = publish(repo, manifest, tree, pki, check=False)
    assert result.returncode == 3
    assert "'share/data/notes.txt'" in result.stderr
    assert "regenerate" in result.stderr
    assert not (repo / "manifests" / "1.0.0").exists()
    changed = hashlib.sha256(b"edited after generate\n").hexdigest()
    assert not (repo / "objects" / "sha256" / changed[:2] / changed[2:]).exists()


def test_publish_rejects_bad_signature(tmp_path: Path, pki: Path, signed) -> None:
    tree, manifest = signed
    repo = tmp_path / "repo"
    Path(f"{manifest}.sig").write_bytes(b"\x30\x03\x02\x01\x00")
    result = publish(repo, manifest, tree, pki, check=False)
    assert result.returncode == 3
    assert not repo.exists()


def test_publish_rejects_missing_file(tmp_path: Path, pki: Path, signed) -> None:
    tree, manifest = signed
    repo = tmp_path / "repo"
    (tree / "etc" / "app.conf").unlink()
    result = publish(repo, manifest, tree, pki, check=False)
    assert result.returncode == 1
    assert "'etc/app.conf' is listed in the manifest but missing" in result.stderr
    assert not (repo / "manifests" / "1.0.0").exists()


def test_reindex_rebuilds_index(tmp_path: Path, pki: Path, signed) -> None:
    tree, manifest = signed
    repo = tmp_path / "repo"
    publish(repo, manifest, tree, pki)
    (repo / "index.sqlite").unlink()
    for suffix in ("-wal", "-shm"):
        Path(f"{repo / 'index.sqlite'}{suffix}").unlink(missing_ok=True)
    result = relman("reindex", "--repo", repo)
    database = sqlite3.connect(repo / "index.sqlite")
    assert result.stdout.strip() == f"indexed 1 releases in {repo}"
    assert database.execute("select version from release_manifests").fetchall() == [
        ("1.0.0",)
    ]
