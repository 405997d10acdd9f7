"""Deploying a release on a node: build the tree from hard links, flip, roll back.

Build: every file of the release becomes a hard link to a read-only inode in
the store. A blob deployed with mode 0444 is linked directly. Any other mode
gets its own read-only copy under ``store/modes/<mode>/``, because a hard
link shares its mode with every other link to the inode. The tree is built
under a staging name and renamed into ``releases/<version>`` when complete.

Flip: a new symlink is written under a temporary name and renamed over
``current``, then the root folder is fsynced. A rename is atomic, so
``current`` always names a complete release; running processes keep the
inodes they opened.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from relman.cas.blobstore import BLOB_MODE, BlobStore
from relman.cas.cms import parse_signature
from relman.cas.errors import InputError, IntegrityError, RelmanError
from relman.cas.filesigs import verify_file_signatures
from relman.cas.fsutil import fsync_dir
from relman.cas.hashing import sha256_file
from relman.cas.manifest import Manifest, ReleaseFile, check_symlinks
from relman.cas.policy import TrustPolicy
from relman.cas.repository import StoredRelease
from relman.cas.verify import verify_signature
from relman.cas.versions import Version, validate_version
from relman.client.node import STAGING_MARK, Node, remove_tree

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeployResult:
    """The outcome of an apply or a rollback."""

    version: str
    previous: str | None
    rollback_id: str
    files: int
    reused_tree: bool
    seconds: float


def deployed_mode(entry: ReleaseFile) -> int:
    """Return the mode a deployed file gets: the manifest's, without write bits."""
    return entry.mode & ~0o222


def apply_release(
    root: str | Path,
    version: str,
    policy: TrustPolicy | None = None,
    allow_downgrade: bool = False,
) -> DeployResult:
    """Deploy ``version`` from the node's store and make it current.

    The manifest must have been verified by ``relman pull`` (recorded in
    state.sqlite with its hash), or verify here under ``policy``. File
    signatures, where the manifest has them, are verified before anything
    is built.

    Raises:
        InputError: the version was not pulled, or it is lower than the
            current one and ``allow_downgrade`` is not set, or the current
            version is below the release's ``min_upgrade_from``.
        VerificationError: the manifest or a blob fails verification.
        ManifestError: the manifest names an unsafe path or symlink.
    """
    started = time.monotonic()
    validate_version(version)
    node = Node.open(root)
    with node.lock(), node.state() as state:
        try:
            release = _load_verified(node, version, policy, state)
            manifest, manifest_hash = release.manifest, release.manifest_hash
            current = node.link_version(node.current)
            _check_upgrade_path(manifest, current, allow_downgrade)
            blobs = node.store.blobs
            _check_symlinks(manifest, blobs)
            _verify_blobs(manifest, blobs)
            signer = parse_signature(release.signature).signer
            verify_file_signatures(manifest, signer, policy)
            reused = _ensure_tree(node, manifest, blobs)
            if current == version:
                previous = node.link_version(node.previous)
            else:
                previous = current
                _flip(node, version, previous)
            rollback_id = state.record_deployment(
                "apply", version, previous, manifest_hash
            )
        except RelmanError as error:
            state.audit("apply", version, "rejected", reason=str(error))
            raise
        state.audit("apply", version, "ok", previous=previous, rollback_id=rollback_id)
    logger.info(
        "applied %s (previous %s, rollback id %s)", version, previous, rollback_id
    )
    return DeployResult(
        version,
        previous,
        rollback_id,
        len(manifest.files),
        reused,
        time.monotonic() - started,
    )


def rollback_release(root: str | Path, rollback_id: str | None = None) -> DeployResult:
    """Make the previous release current again.

    Without ``rollback_id`` the node flips to what ``previous`` points at. With
    it, the node flips to the release that the recorded apply replaced.

    Raises:
        InputError: there is nothing to roll back to, or the id is unknown.
        IntegrityError: the target tree no longer matches its manifest.
    """
    started = time.monotonic()
    node = Node.open(root)
    with node.lock(), node.state() as state:
        current = node.link_version(node.current)
        target = _rollback_target(node, state, rollback_id)
        if target == current:
            raise InputError(
                f"version {target} is already current; nothing to roll back"
            )
        try:
            release = node.store.load_release(target)
            _check_tree(node.releases / target, release.manifest, node.store.blobs)
            _flip(node, target, current)
        except RelmanError as error:
            state.audit("rollback", target, "rejected", reason=str(error))
            raise
        new_id = state.record_deployment(
            "rollback", target, current, release.manifest_hash
        )
        state.audit("rollback", target, "ok", previous=current, rollback_id=new_id)
    logger.info("rolled back from %s to %s", current, target)
    return DeployResult(
        target,
        current,
        new_id,
        len(release.manifest.files),
        True,
        time.monotonic() - started,
    )


def _rollback_target(node: Node, state, rollback_id: str | None) -> str:  # noqa: ANN001
    if rollback_id is None:
        target = node.link_version(node.previous)
        if target is None:
            raise InputError(
                f"{str(node.root)!r} has no previous release to roll back to; apply "
                "two releases first, or apply the one you want"
            )
        return target
    deployment = state.deployment(rollback_id)
    if deployment is None:
        raise InputError(
            f"rollback id {rollback_id!r} is unknown; see `relman status` for the ids"
        )
    if not deployment["previous_version"]:
        raise InputError(
            f"rollback id {rollback_id!r} replaced no release; nothing to roll back to"
        )
    return deployment["previous_version"]


def _load_verified(
    node: Node, version: str, policy: TrustPolicy | None, state
) -> StoredRelease:  # noqa: ANN001
    try:
        release = node.store.load_release(version)
    except KeyError as error:
        raise InputError(
            f"version {version} is not in {str(node.root / 'store')!r}; run "
            f"`relman pull --version {version}` first"
        ) from error
    if policy is not None:
        verify_signature(
            release.body,
            release.signature,
            policy,
            release.timestamp,
            audit=state.security_audit,
        )
    elif state.verified_hash(version) != release.manifest_hash:
        raise InputError(
            f"the manifest of {version} in the store was not verified by `relman pull` "
            "on this node; pull it again, or pass --trust CA.pem to verify it now"
        )
    return release


def _check_upgrade_path(
    manifest: Manifest, current: str | None, allow_downgrade: bool
) -> None:
    if current is None or current == manifest.version:
        return
    if Version(manifest.version) < Version(current) and not allow_downgrade:
        raise InputError(
            f"version {manifest.version} is lower than the current {current}; pass "
            "--allow-downgrade to install it anyway, or use `relman rollback`"
        )
    floor = manifest.min_upgrade_from
    if floor and Version(current) < Version(floor):
        raise InputError(
            f"version {manifest.version} requires an upgrade from {floor} or later, "
            f"but the node runs {current}; apply an intermediate release first"
        )


def _check_symlinks(manifest: Manifest, blobs: BlobStore) -> None:
    targets = {}
    for entry in manifest.files:
        if entry.type == "symlink":
            targets[entry.path] = blobs.read_bytes(entry.sha256_hash).decode(
                "utf-8", "surrogateescape"
            )
    check_symlinks(targets)


def _verify_blobs(manifest: Manifest, blobs: BlobStore) -> None:
    """Re-hash every blob the release uses, so a corrupted store is never deployed."""
    unique = {entry.sha256_hash: entry for entry in manifest.files}

    def check(entry: ReleaseFile) -> None:
        path = blobs.path(entry.sha256_hash)
        if not path.is_file():
            raise IntegrityError(
                f"blob {entry.sha256_hash} for {entry.path!r} is missing from the store; pull the release again"
            )
        digest, size = sha256_file(path)
        if digest != entry.sha256_hash or size != entry.size_bytes:
            raise IntegrityError(
                f"blob for {entry.path!r} in the store is corrupt: expected sha256 "
                f"{entry.sha256_hash}, got {digest}; remove it and pull again"
            )

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        list(pool.map(check, unique.values()))


def _ensure_tree(node: Node, manifest: Manifest, blobs: BlobStore) -> bool:
    """Make sure ``releases/<version>`` is complete; return True if it already was."""
    target = node.releases / manifest.version
    if target.is_dir():
        try:
            _check_tree(target, manifest, blobs)
            return True
        except IntegrityError as error:
            logger.warning("rebuilding %s: %s", target, error)
            remove_tree(target)
    staging = node.releases / f".{manifest.version}{STAGING_MARK}{secrets.token_hex(4)}"
    staging.mkdir(mode=0o755)
    try:
        _build_tree(staging, manifest, blobs)
        os.sync()
        os.rename(staging, target)
    except BaseException:
        remove_tree(staging)
        raise
    fsync_dir(node.releases)
    return False


def _build_tree(staging: Path, manifest: Manifest, blobs: BlobStore) -> None:
    for entry in manifest.files:
        destination = staging / entry.path
        destination.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        if entry.type == "symlink":
            target = blobs.read_bytes(entry.sha256_hash).decode(
                "utf-8", "surrogateescape"
            )
            os.symlink(target, destination)
        else:
            os.link(
                mode_inode(blobs, entry.sha256_hash, deployed_mode(entry)), destination
            )


def mode_inode(blobs: BlobStore, digest: str, mode: int) -> Path:
    """Return the store file with ``digest``'s bytes and ``mode``, creating it if needed."""
    blob = blobs.path(digest)
    if mode == BLOB_MODE:
        return blob
    target = blobs.root / "modes" / f"{mode:04o}" / digest[:2] / digest[2:]
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.parent / f".{digest[2:]}.{secrets.token_hex(4)}"
    try:
        with open(blob, "rb") as source, open(temporary, "xb") as copy:
            while chunk := source.read(1024 * 1024):
                copy.write(chunk)
            os.fchmod(copy.fileno(), mode)
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return target


def _check_tree(tree: Path, manifest: Manifest, blobs: BlobStore) -> None:
    """Raise IntegrityError unless every file in ``tree`` is the store's inode for it."""
    if not tree.is_dir():
        raise IntegrityError(f"release tree {str(tree)!r} is missing")
    for entry in manifest.files:
        path = tree / entry.path
        try:
            info = path.lstat()
        except FileNotFoundError as error:
            raise IntegrityError(
                f"{entry.path!r} is missing from {str(tree)!r}"
            ) from error
        if entry.type == "symlink":
            expected = blobs.read_bytes(entry.sha256_hash).decode(
                "utf-8", "surrogateescape"
            )
            if not path.is_symlink() or os.readlink(path) != expected:
                raise IntegrityError(
                    f"symlink {entry.path!r} in {str(tree)!r} was changed"
                )
            continue
        source = mode_inode(blobs, entry.sha256_hash, deployed_mode(entry)).stat()
        if (info.st_ino, info.st_dev) != (source.st_ino, source.st_dev):
            raise IntegrityError(
                f"{entry.path!r} in {str(tree)!r} is not the store's file"
            )
        if (info.st_mode & 0o7777) != deployed_mode(entry):
            raise IntegrityError(
                f"{entry.path!r} in {str(tree)!r} has mode {info.st_mode & 0o7777:04o}"
            )


def _flip(node: Node, version: str, previous: str | None) -> None:
    """Point ``current`` at ``version`` and ``previous`` at ``previous``, atomically each."""
    _replace_link(node.root, "current", f"releases/{version}")
    if previous:
        _replace_link(node.root, "previous", f"releases/{previous}")
    fsync_dir(node.root)


def _replace_link(root: Path, name: str, target: str) -> None:
    temporary = root / f".{name}.{secrets.token_hex(4)}"
    os.symlink(target, temporary)
    try:
        os.replace(temporary, root / name)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
