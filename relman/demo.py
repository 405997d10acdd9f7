"""``relman demo``: the whole path on real files, from a release folder to a rollback.

Release 1.0.0 is a real folder (default: this Python's standard library,
without site-packages and __pycache__). Release 1.1.0 is a copy with some
files changed, added and removed. Both are signed with a fresh development
PKI and published. A mirror serves them on 127.0.0.1. A node pulls and
applies 1.0.0, then 1.1.0 (fetching only what changed), then rolls back.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import uvloop

from relman.cas.audit import AuditFile
from relman.cas.cms import sign_detached
from relman.cas.console import format_bytes
from relman.cas.errors import InputError, RelmanError
from relman.cas.fsutil import atomic_write_bytes
from relman.cas.generate import ReleaseInfo, build_manifest
from relman.cas.pki import init_pki
from relman.cas.policy import policy_from_roots
from relman.cas.publish import publish_release
from relman.client.deploy import apply_release, rollback_release
from relman.client.pull import pull_release

logger = logging.getLogger(__name__)

DEFAULT_EXCLUDES = ("site-packages", "__pycache__")
CHANGED_FILES = 25
ADDED_FILES = 5
REMOVED_FILES = 5
SERVER_START_SECONDS = 30

Result = TypeVar("Result")


def register(subcommands: argparse._SubParsersAction) -> None:
    demo = subcommands.add_parser(
        "demo",
        help="run sign, publish, serve, pull, apply and rollback end to end",
        description=__doc__.split("\n\n", 1)[1],
    )
    demo.add_argument(
        "--source",
        metavar="DIR",
        help="folder to release as 1.0.0 (default: this Python's standard library)",
    )
    demo.add_argument(
        "--workdir",
        metavar="DIR",
        help="folder for the PKI, repository and node (default: a new temporary "
        "folder, removed afterwards)",
    )
    demo.add_argument("--keep", action="store_true", help="keep the temporary folder")
    demo.set_defaults(handler=run_demo)


def run_demo(arguments: argparse.Namespace) -> int:
    source, excludes = _choose_source(arguments.source)
    if arguments.workdir:
        workdir = Path(arguments.workdir)
        if workdir.exists() and not workdir.is_dir():
            raise InputError(f"--workdir {str(workdir)!r} is not a folder")
        workdir.mkdir(parents=True, exist_ok=True)
        if any(workdir.iterdir()):
            raise InputError(
                f"--workdir {str(workdir)!r} is not empty; choose an empty or new folder"
            )
        keep = True
    else:
        workdir = Path(tempfile.mkdtemp(prefix="relman-demo-"))
        keep = arguments.keep
    print(f"relman demo in {workdir}")
    print(
        f"release 1.0.0 is {source}"
        + (f" without {', '.join(excludes)}" if excludes else "")
    )
    try:
        _run_steps(source, excludes, workdir)
    finally:
        if keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


def _choose_source(option: str | None) -> tuple[Path, tuple[str, ...]]:
    if option:
        source = Path(option)
        if not source.is_dir():
            raise InputError(f"--source {option!r} is not a folder")
        return source, ()
    return Path(sysconfig.get_paths()["stdlib"]), DEFAULT_EXCLUDES


def _step(title: str, action: Callable[[], Result]) -> Result:
    print(f"\n== {title}")
    started = time.monotonic()
    result = action()
    print(f"   done in {time.monotonic() - started:.2f} s")
    return result


def _run_steps(source: Path, excludes: tuple[str, ...], workdir: Path) -> None:
    pki = workdir / "pki"
    repo = workdir / "repo"
    node = workdir / "node"
    second_tree = workdir / "release-1.1.0"

    _step("create a development PKI", lambda: init_pki(pki))
    trust = policy_from_roots(pki / "ca.pem")
    _step(
        "make release 1.1.0: copy 1.0.0, change, add and remove files",
        lambda: _make_second_release(source, excludes, second_tree),
    )

    for version, tree in (("1.0.0", source), ("1.1.0", second_tree)):
        _step(
            f"generate, sign and publish {version}",
            lambda version=version, tree=tree: _publish(
                version, tree, excludes, pki, repo, trust, workdir
            ),
        )

    with _mirror(repo) as url:
        print(f"\n   mirror serving {repo} on {url}")
        for version in ("1.0.0", "1.1.0"):
            _step(
                f"node pulls {version}",
                lambda version=version: _pull(url, node, trust, version),
            )
            _step(
                f"node applies {version}", lambda version=version: _apply(node, version)
            )
        _step("node rolls back", lambda: _rollback(node))
    print("\n   mirror stopped")
    print(
        f"\nnode: current -> {os.readlink(node / 'current')}, previous -> {os.readlink(node / 'previous')}"
    )


def _make_second_release(source: Path, excludes: tuple[str, ...], target: Path) -> None:
    copied = _link_or_copy_tree(source, target, excludes)
    files = sorted(
        path for path in target.rglob("*") if path.is_file() and not path.is_symlink()
    )
    if len(files) < CHANGED_FILES + REMOVED_FILES:
        raise InputError(
            f"--source contains {len(files)} files; the demo needs at least "
            f"{CHANGED_FILES + REMOVED_FILES} to change and remove some"
        )
    step = max(1, len(files) // (CHANGED_FILES + REMOVED_FILES))
    chosen = files[::step][: CHANGED_FILES + REMOVED_FILES]
    for path in chosen[:CHANGED_FILES]:
        # Replace, never write in place: the file may be a hard link to the source.
        data = path.read_bytes() + b"\n# changed in relman demo release 1.1.0\n"
        path.unlink()
        path.write_bytes(data)
    for path in chosen[CHANGED_FILES:]:
        path.unlink()
    added = target / "relman-demo-added"
    added.mkdir()
    for number in range(ADDED_FILES):
        (added / f"file-{number}.txt").write_text(
            f"added in 1.1.0, file {number}\n" * 100
        )
    print(
        f"   {copied} files copied, {CHANGED_FILES} changed, {ADDED_FILES} added, {REMOVED_FILES} removed"
    )


def _link_or_copy_tree(source: Path, target: Path, excludes: tuple[str, ...]) -> int:
    """Recreate ``source`` under ``target`` with hard links, copying across file systems."""
    count = 0
    for folder, subfolders, files in os.walk(source):
        subfolders[:] = sorted(name for name in subfolders if name not in excludes)
        relative = Path(folder).relative_to(source)
        (target / relative).mkdir(parents=True, exist_ok=True)
        for name in files:
            origin = Path(folder) / name
            destination = target / relative / name
            if origin.is_symlink():
                os.symlink(os.readlink(origin), destination)
            else:
                try:
                    os.link(origin, destination)
                except OSError as error:
                    if error.errno not in (errno.EXDEV, errno.EPERM, errno.EACCES):
                        raise
                    shutil.copy2(origin, destination)
            count += 1
    return count


def _publish(
    version: str, tree: Path, excludes, pki: Path, repo: Path, trust, workdir: Path
) -> None:  # noqa: ANN001
    manifest = build_manifest(tree, ReleaseInfo(version=version), excludes)
    body = manifest.canonical()
    manifest_file = workdir / f"manifest-{version}.json"
    atomic_write_bytes(manifest_file, body)
    signature = sign_detached(body, pki / "signer.key", pki / "signer.pem")
    audit = AuditFile(workdir / "audit.jsonl")
    result = publish_release(repo, body, signature, tree, trust, audit=audit)
    print(
        f"   {len(manifest.files)} files, {format_bytes(manifest.total_size)}; "
        f"{format_bytes(result.bytes_copied)} of new blobs stored; manifest sha256 "
        f"{result.manifest_hash[:16]}..."
    )


def _pull(url: str, node: Path, trust, version: str) -> None:  # noqa: ANN001
    result = uvloop.run(pull_release(url, node, trust, version))
    share = (
        result.stats.bytes_received / result.release_size if result.release_size else 0
    )
    print(
        f"   fetched {result.stats.blobs_fetched} blobs, "
        f"{format_bytes(result.stats.bytes_received)} of a "
        f"{format_bytes(result.release_size)} release ({share:.1%})"
    )


def _apply(node: Path, version: str) -> None:
    result = apply_release(node, version)
    print(
        f"   current -> releases/{result.version}, previous -> {result.previous or 'none'}, "
        f"{result.files} files hard-linked from the store"
    )


def _rollback(node: Path) -> None:
    result = rollback_release(node)
    print(f"   current -> releases/{result.version} (was {result.previous})")


@contextmanager
def _mirror(repo: Path) -> Iterator[str]:
    """Run ``relman serve`` on a free port of 127.0.0.1; yield its URL, then stop it."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "relman",
            "--quiet",
            "serve",
            "--repo",
            str(repo),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        url = _read_url(process)
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _read_url(process: subprocess.Popen) -> str:
    assert process.stdout is not None
    deadline = time.monotonic() + SERVER_START_SECONDS
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        match = re.search(r"http://\S+", line)
        if match:
            return match.group(0)
    raise RelmanError(
        f"the mirror did not start within {SERVER_START_SECONDS} s (exit code {process.poll()})"
    )
