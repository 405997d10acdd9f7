"""Stress: apply and pull killed with SIGKILL at random moments, many times.

Marked slow, so ``make test`` leaves them out; ``make stress`` runs them.
RELMAN_STRESS_ROUNDS sets the number of kills per test.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.support import (
    RELMAN,
    MirrorProcess,
    make_release_tree,
    publish_version,
    relman,
)

pytestmark = pytest.mark.slow

ROUNDS = int(os.environ.get("RELMAN_STRESS_ROUNDS", "20"))
FILES = 1500


def many_files(root: Path, seed: int) -> Path:
    """A release of FILES small files in nested folders, some executable, some links."""
    generator = random.Random(seed)
    make_release_tree(root, big_size=256 * 1024, seed=seed)
    for number in range(FILES):
        folder = root / "many" / f"d{number % 37}" / f"e{number % 11}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"f{number}.dat"
        path.write_bytes(generator.randbytes(generator.randint(0, 2048)))
        if number % 9 == 0:
            os.chmod(path, 0o755)
    return root


@pytest.fixture(scope="module")
def stress_repo(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("stress")
    relman("pki", "init", work / "pki")
    first = many_files(work / "tree-1", seed=1)
    second = work / "tree-2"
    shutil.copytree(first, second, symlinks=True)
    for number in range(0, FILES, 5):
        path = (
            second / "many" / f"d{number % 37}" / f"e{number % 11}" / f"f{number}.dat"
        )
        mode = path.stat().st_mode
        path.unlink()
        path.write_bytes(b"changed %d\n" % number)
        os.chmod(path, mode & 0o777)
    repo = work / "repo"
    publish_version(work, work / "pki", repo, "1.0.0", first)
    publish_version(work, work / "pki", repo, "2.0.0", second)
    server = MirrorProcess(repo)
    yield {"work": work, "repo": repo, "url": server.url, "ca": work / "pki" / "ca.pem"}
    server.stop()


def release_matches(root: Path, repo: Path) -> str:
    """Return the version ``current`` names, after checking every file against its manifest."""
    version = os.readlink(root / "current").split("/")[-1]
    manifest = json.loads((repo / "manifests" / version / "manifest.json").read_bytes())
    for entry in manifest["files"]:
        path = root / "current" / entry["path"]
        if entry["type"] == "symlink":
            assert path.is_symlink(), entry["path"]
            continue
        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256_hash"], (
            entry["path"]
        )
    return version


def test_apply_killed_repeatedly(stress_repo: dict, tmp_path: Path) -> None:
    root = tmp_path / "node"
    for version in ("1.0.0", "2.0.0"):
        relman(
            "pull",
            "--mirror",
            stress_repo["url"],
            "--root",
            root,
            "--trust",
            stress_repo["ca"],
            "--version",
            version,
        )
    relman("apply", "--root", root, "--version", "1.0.0")
    generator = random.Random(7)
    for round_number in range(ROUNDS):
        version = "2.0.0" if round_number % 2 == 0 else "1.0.0"
        extra = ["--allow-downgrade"] if version == "1.0.0" else []
        process = subprocess.Popen(
            [*RELMAN, "apply", "--root", str(root), "--version", version, *extra],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(generator.uniform(0.05, 1.2))
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert release_matches(root, stress_repo["repo"]) in ("1.0.0", "2.0.0")
    relman("apply", "--root", root, "--version", "2.0.0")
    assert release_matches(root, stress_repo["repo"]) == "2.0.0"
    assert not [name for name in os.listdir(root / "releases") if name.startswith(".")]


def test_pull_killed_repeatedly(stress_repo: dict, tmp_path: Path) -> None:
    root = tmp_path / "node"
    generator = random.Random(11)
    for _ in range(ROUNDS):
        process = subprocess.Popen(
            [
                *RELMAN,
                "pull",
                "--mirror",
                stress_repo["url"],
                "--root",
                str(root),
                "--trust",
                str(stress_repo["ca"]),
                "--version",
                "1.0.0",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(generator.uniform(0.05, 1.0))
        process.send_signal(signal.SIGKILL)
        process.wait()
    relman(
        "pull",
        "--mirror",
        stress_repo["url"],
        "--root",
        root,
        "--trust",
        stress_repo["ca"],
        "--version",
        "1.0.0",
    )
    objects = root / "store" / "objects" / "sha256"
    for blob in objects.rglob("*"):
        if blob.is_file():
            digest = blob.parent.name + blob.name
            assert hashlib.sha256(blob.read_bytes()).hexdigest() == digest
    relman("apply", "--root", root, "--version", "1.0.0")
    assert release_matches(root, stress_repo["repo"]) == "1.0.0"
