"""relman generate: scanning, determinism, file facts and rejected trees."""

from __future__ import annotations

import json
import os
import socket
import stat
from pathlib import Path

import pytest

from relman.cas.canonical import canonical_bytes
from tests.support import make_release_tree, relman


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_release_tree(tmp_path / "release", big_size=64 * 1024)


def generate(tree: Path, output: Path, *extra: str, check: bool = True):
    return relman(
        "generate",
        "--version",
        "1.0.0",
        "--release-dir",
        tree,
        "--output",
        output,
        *extra,
        check=check,
    )


def load(path: Path) -> dict:
    return json.loads(path.read_bytes())


def test_generate_is_byte_identical(tree: Path, tmp_path: Path) -> None:
    generate(tree, tmp_path / "a.json")
    generate(tree, tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


def test_generate_writes_canonical_json(tree: Path, tmp_path: Path) -> None:
    generate(tree, tmp_path / "m.json")
    body = (tmp_path / "m.json").read_bytes()
    assert canonical_bytes(json.loads(body)) == body


def test_generate_manifest_fields(tree: Path, tmp_path: Path) -> None:
    generate(
        tree,
        tmp_path / "m.json",
        "--critical",
        "--min-upgrade-from",
        "0.9.0",
        "--dependency",
        "libc>=2.31",
        "--build-commit",
        "abc123",
        "--release-notes",
        "notes",
    )
    manifest = load(tmp_path / "m.json")
    assert set(manifest) == {
        "schema_version",
        "version",
        "tag_name",
        "release_notes",
        "release_date",
        "is_critical",
        "build",
        "dependencies",
        "min_upgrade_from",
        "files",
    }
    assert manifest["version"] == "1.0.0"
    assert manifest["tag_name"] == "v1.0.0"
    assert manifest["is_critical"] is True
    assert manifest["min_upgrade_from"] == "0.9.0"
    assert manifest["dependencies"] == ["libc>=2.31"]
    assert manifest["build"] == {"build_commit": "abc123"}
    assert manifest["release_notes"] == "notes"


def test_generate_file_entries(tree: Path, tmp_path: Path) -> None:
    generate(tree, tmp_path / "m.json")
    files = {entry["path"]: entry for entry in load(tmp_path / "m.json")["files"]}
    assert list(files) == sorted(files)
    assert set(files) == {
        "bin/server",
        "bin/start.sh",
        "empty.dat",
        "etc/app.conf",
        "lib/libdemo.so",
        "lib/libdemo.so.1",
        "share/data/big.bin",
        "share/data/notes.txt",
    }
    server = files["bin/server"]
    assert server["type"] == "executable"
    assert server["permissions"] == "0755"
    assert server["platform"] == "linux"
    assert server["architecture"] in {"x64", "arm64"}
    assert server["size_bytes"] == (tree / "bin" / "server").stat().st_size
    assert files["bin/start.sh"]["permissions"] == "0750"
    assert files["bin/start.sh"]["platform"] == "any"
    assert files["lib/libdemo.so.1"]["type"] == "library"
    assert files["lib/libdemo.so.1"]["architecture"] == "x64"
    assert files["etc/app.conf"]["type"] == "config"
    assert files["share/data/notes.txt"]["type"] == "data"
    assert files["empty.dat"]["sha256_hash"] == (
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    )


def test_generate_records_symlink_target(tree: Path, tmp_path: Path) -> None:
    generate(tree, tmp_path / "m.json")
    files = {entry["path"]: entry for entry in load(tmp_path / "m.json")["files"]}
    link = files["lib/libdemo.so"]
    assert link["type"] == "symlink"
    assert link["size_bytes"] == len("libdemo.so.1")


def test_generate_rewrites_absolute_link_inside(tree: Path, tmp_path: Path) -> None:
    os.symlink(tree / "etc" / "app.conf", tree / "bin" / "app.conf")
    generate(tree, tmp_path / "m.json")
    files = {entry["path"]: entry for entry in load(tmp_path / "m.json")["files"]}
    assert files["bin/app.conf"]["type"] == "symlink"
    assert files["bin/app.conf"]["size_bytes"] == len("../etc/app.conf")


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("../x", "leaves the release tree"),
        ("../../etc/passwd", "leaves the release tree"),
        ("/etc/x", "outside the release folder"),
    ],
)
def test_generate_rejects_link_leaving_tree(
    tree: Path, tmp_path: Path, target: str, message: str
) -> None:
    os.symlink(target, tree / "escape")
    output = tmp_path / "m.json"
    result = generate(tree, output, check=False)
    assert result.returncode == 1
    assert "'escape'" in result.stderr
    assert message in result.stderr
    assert not output.exists()


def test_generate_rejects_dotdot_through_link(tree: Path, tmp_path: Path) -> None:
    os.symlink(".", tree / "share" / "here")
    os.symlink("here/../../x", tree / "share" / "sneaky")
    result = generate(tree, tmp_path / "m.json", check=False)
    assert result.returncode == 1
    assert "'share/sneaky'" in result.stderr
    assert not (tmp_path / "m.json").exists()


def test_generate_rejects_fifo(tree: Path, tmp_path: Path) -> None:
    os.mkfifo(tree / "etc" / "pipe")
    result = generate(tree, tmp_path / "m.json", check=False)
    assert result.returncode == 1
    assert "'etc/pipe'" in result.stderr
    assert "fifo" in result.stderr
    assert not (tmp_path / "m.json").exists()


def test_generate_rejects_socket(tree: Path, tmp_path: Path, monkeypatch) -> None:
    server = socket.socket(socket.AF_UNIX)
    monkeypatch.chdir(tree)
    try:
        server.bind("control.sock")
        result = generate(tree, tmp_path / "m.json", check=False)
    finally:
        server.close()
    assert result.returncode == 1
    assert "'control.sock'" in result.stderr
    assert "socket" in result.stderr


def test_generate_exclude_skips_paths(tree: Path, tmp_path: Path) -> None:
    os.mkfifo(tree / "etc" / "pipe")
    generate(tree, tmp_path / "m.json", "--exclude", "pipe", "--exclude", "share/*")
    paths = [entry["path"] for entry in load(tmp_path / "m.json")["files"]]
    assert "etc/pipe" not in paths
    assert not any(path.startswith("share/") for path in paths)


def test_generate_rejects_output_inside_tree(tree: Path) -> None:
    result = generate(tree, tree / "manifest.json", check=False)
    assert result.returncode == 1
    assert "inside the release folder" in result.stderr
    assert not (tree / "manifest.json").exists()


def test_generate_rejects_invalid_version(tree: Path, tmp_path: Path) -> None:
    result = relman(
        "generate",
        "--version",
        "../1.0",
        "--release-dir",
        tree,
        "--output",
        tmp_path / "m.json",
        check=False,
    )
    assert result.returncode == 1
    assert "invalid version '../1.0'" in result.stderr
    assert not (tmp_path / "m.json").exists()


def test_generate_release_date_from_epoch(
    tree: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    generate(tree, tmp_path / "m.json")
    assert load(tmp_path / "m.json")["release_date"] == "2023-11-14T22:13:20Z"


def test_generate_keeps_setuid_out(tree: Path, tmp_path: Path) -> None:
    os.chmod(tree / "bin" / "server", 0o4755)
    generate(tree, tmp_path / "m.json")
    files = {entry["path"]: entry for entry in load(tmp_path / "m.json")["files"]}
    assert files["bin/server"]["permissions"] == "0755"
    assert stat.S_IMODE((tree / "bin" / "server").stat().st_mode) == 0o4755


@pytest.mark.skipif(os.geteuid() != 0, reason="creating a device node needs root")
def test_generate_rejects_device(tree: Path, tmp_path: Path) -> None:
    os.mknod(tree / "etc" / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    result = generate(tree, tmp_path / "m.json", check=False)
    assert result.returncode == 1
    assert "'etc/null'" in result.stderr
    assert "character device" in result.stderr
    assert not (tmp_path / "m.json").exists()
