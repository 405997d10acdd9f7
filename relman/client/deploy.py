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

import ctypes
import errno
import logging
import os
import secrets
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
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
from relman.client.state import NodeState

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
        finish_interrupted_flip(node, state)
        try:
            release, moment = _load_verified(node, version, policy, state)
            manifest, manifest_hash = release.manifest, release.manifest_hash
            current = node.link_version(node.current)
            _check_upgrade_path(manifest, current, allow_downgrade)
            blobs = node.store.blobs
            check_release_symlinks(manifest, blobs)
            _verify_blobs(manifest, blobs)
            signer = parse_signature(release.signature).signer
            verify_file_signatures(manifest, signer, policy, moment)
            reused = _ensure_tree(node, manifest, blobs)
            if current == version:
                previous = node.link_version(node.previous)
                rollback_id = state.record_deployment(
                    "apply", version, previous, manifest_hash
                )
            else:
                previous = current
                rollback_id = _flip(
                    node, state, "apply", version, previous, manifest_hash
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
        IntegrityError: a blob of the target release is missing or corrupt.
    """
    started = time.monotonic()
    node = Node.open(root)
    with node.lock(), node.state() as state:
        finish_interrupted_flip(node, state)
        current = node.link_version(node.current)
        target = _rollback_target(node, state, rollback_id)
        if target == current:
            raise InputError(
                f"version {target} is already current; nothing to roll back"
            )
        try:
            release = _load_stored(node, target)
            # The tree was verified when it was applied; check it again, and
            # rebuild it from the verified store if a file was changed since.
            _verify_blobs(release.manifest, node.store.blobs)
            _ensure_tree(node, release.manifest, node.store.blobs)
            new_id = _flip(
                node, state, "rollback", target, current, release.manifest_hash
            )
        except RelmanError as error:
            state.audit("rollback", target, "rejected", reason=str(error))
            raise
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


def _load_stored(node: Node, version: str) -> StoredRelease:
    try:
        return node.store.load_release(version)
    except KeyError as error:
        raise InputError(
            f"version {version} is not in {str(node.root / 'store')!r}; run "
            f"`relman pull --mirror URL --root {node.root} --trust CA.pem --version {version}` first"
        ) from error


def _load_verified(
    node: Node, version: str, policy: TrustPolicy | None, state
) -> tuple[StoredRelease, datetime | None]:  # noqa: ANN001
    """Return the stored release and, when verified here, its timestamp's time."""
    release = _load_stored(node, version)
    if policy is not None:
        verification = verify_signature(
            release.body,
            release.signature,
            policy,
            release.timestamp,
            audit=state.security_audit,
        )
        stamp = verification.timestamp
        return release, stamp.time if stamp else None
    if state.verified_hash(version) != release.manifest_hash:
        raise InputError(
            f"the manifest of {version} in the store was not verified by `relman pull` "
            "on this node; pull it again, or pass --trust CA.pem to verify it now"
        )
    return release, None


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


def check_release_symlinks(manifest: Manifest, blobs: BlobStore) -> None:
    """Raise ManifestError unless every symlink of the release stays inside its tree."""
    targets = {}
    for entry in manifest.files:
        if entry.type == "symlink":
            targets[entry.path] = blobs.read_bytes(entry.sha256_hash).decode(
                "utf-8", "surrogateescape"
            )
    check_symlinks(targets)


def _verify_blobs(manifest: Manifest, blobs: BlobStore) -> None:
    """Re-hash every file a release links to, so a corrupted store is never deployed.

    Those are the blobs, for mode 0444, and the per-mode copies. A file with
    the right bytes but a changed mode gets its mode back. A corrupt per-mode
    copy is rebuilt from its verified blob. A corrupt blob is removed, so that
    the next pull fetches it again, and the apply fails.
    """
    pairs = {
        (entry.sha256_hash, deployed_mode(entry)): entry
        for entry in manifest.files
        if entry.type != "symlink"
    }
    blob_entries = {entry.sha256_hash: entry for entry in manifest.files}

    def check_blob(entry: ReleaseFile) -> None:
        path = blobs.path(entry.sha256_hash)
        if not path.is_file():
            raise IntegrityError(
                f"blob {entry.sha256_hash} for {entry.path!r} is missing from the store; "
                f"run `relman pull --version {manifest.version}` again"
            )
        if not _repair_mode(path, entry, BLOB_MODE):
            path.unlink()
            raise IntegrityError(
                f"blob {path} for {entry.path!r} was corrupt and has been removed; run "
                f"`relman pull --version {manifest.version}` to fetch it again"
            )

    def check_copy(key: tuple[str, int]) -> None:
        digest, mode = key
        entry = pairs[key]
        copy = mode_inode_path(blobs, digest, mode)
        if mode != BLOB_MODE and copy.is_file() and not _repair_mode(copy, entry, mode):
            logger.warning("rebuilding corrupt store copy %s of %s", copy, entry.path)
            copy.unlink()

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        list(pool.map(check_blob, blob_entries.values()))
        list(pool.map(check_copy, pairs))


def _repair_mode(path: Path, entry: ReleaseFile, mode: int) -> bool:
    """Return True if ``path`` has the entry's bytes, after setting ``mode`` if it drifted."""
    if not _same_content(path, entry):
        return False
    if (path.stat().st_mode & 0o7777) != mode:
        logger.warning("resetting mode of %s to %04o", path, mode)
        os.chmod(path, mode)
    return True


def _same_content(path: Path, entry: ReleaseFile) -> bool:
    digest, size = sha256_file(path)
    return digest == entry.sha256_hash and size == entry.size_bytes


def _ensure_tree(node: Node, manifest: Manifest, blobs: BlobStore) -> bool:
    """Make sure ``releases/<version>`` is complete; return True if it already was.

    A tree that no longer matches is rebuilt beside it and swapped in with one
    atomic exchange of the two folders, so a running release never finds a
    missing or half-built tree, even when relman is killed in between.
    """
    target = node.releases / manifest.version
    stale = False
    if target.is_dir():
        try:
            _check_tree(target, manifest, blobs)
            return True
        except IntegrityError as error:
            logger.warning("rebuilding %s: %s", target, error)
            stale = True
    staging = node.releases / f".{manifest.version}{STAGING_MARK}{secrets.token_hex(4)}"
    staging.mkdir(mode=0o755)
    try:
        _build_tree(staging, manifest, blobs)
        os.sync()
        if stale:
            exchange_paths(staging, target)
        else:
            os.rename(staging, target)
    except BaseException:
        remove_tree(staging)
        raise
    fsync_dir(node.releases)
    if stale:
        # After the exchange, the staging name points to the old tree.
        remove_tree(staging)
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
            _link_or_copy(
                mode_inode(blobs, entry.sha256_hash, deployed_mode(entry)), destination
            )


def _link_or_copy(source: Path, destination: Path) -> None:
    """Hard-link ``source``; copy it once the inode has the file system's maximum of links."""
    try:
        os.link(source, destination)
    except OSError as error:
        if error.errno != errno.EMLINK:
            raise
        logger.warning(
            "%s has the maximum number of links; copying it to %s", source, destination
        )
        shutil.copyfile(source, destination)
        os.chmod(destination, source.stat().st_mode & 0o7777)


def mode_inode_path(blobs: BlobStore, digest: str, mode: int) -> Path:
    """Return where the store keeps ``digest``'s bytes with ``mode``."""
    if mode == BLOB_MODE:
        return blobs.path(digest)
    return blobs.root / "modes" / f"{mode:04o}" / digest[:2] / digest[2:]


def mode_inode(blobs: BlobStore, digest: str, mode: int) -> Path:
    """Return the store file with ``digest``'s bytes and ``mode``, creating it if needed."""
    blob = blobs.path(digest)
    target = mode_inode_path(blobs, digest, mode)
    if mode == BLOB_MODE or target.is_file():
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
    """Raise IntegrityError unless ``tree`` holds exactly the release's files.

    Each file must be the store's verified inode for its content and mode (or,
    where the inode ran out of links, a copy with the same bytes and mode),
    and nothing else may be in the tree.
    """
    if not tree.is_dir():
        raise IntegrityError(f"release tree {str(tree)!r} is missing")
    _check_no_extra_entries(tree, manifest)
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
        same_inode = (info.st_ino, info.st_dev) == (source.st_ino, source.st_dev)
        is_copy = info.st_nlink == 1 and path.is_file() and _same_content(path, entry)
        if not (same_inode or is_copy):
            raise IntegrityError(
                f"{entry.path!r} in {str(tree)!r} is not the store's file"
            )
        if (info.st_mode & 0o7777) != deployed_mode(entry):
            raise IntegrityError(
                f"{entry.path!r} in {str(tree)!r} has mode {info.st_mode & 0o7777:04o}"
            )


def _check_no_extra_entries(tree: Path, manifest: Manifest) -> None:
    expected = {entry.path for entry in manifest.files}
    folders = {
        "/".join(entry.path.split("/")[:depth])
        for entry in manifest.files
        for depth in range(1, entry.path.count("/") + 1)
    }
    for folder, subfolders, files in os.walk(tree):
        relative = os.path.relpath(folder, tree)
        prefix = "" if relative == "." else relative + "/"
        for name in files + subfolders:
            path = prefix + name
            if path not in expected and path not in folders:
                raise IntegrityError(
                    f"{path!r} in {str(tree)!r} is not part of the release"
                )
        # Symlinks to folders are listed in subfolders but are entries, not folders.
        subfolders[:] = [name for name in subfolders if prefix + name in folders]


def _flip(
    node: Node,
    state: NodeState,
    action: str,
    version: str,
    previous: str | None,
    manifest_hash: str,
) -> str:
    """Point ``current`` at ``version`` and ``previous`` at ``previous``; return the rollback id.

    Each link is replaced atomically, but the two renames are two steps. The
    flip is written to the journal first, so that a crash between them is
    finished by ``finish_interrupted_flip`` under the next lock.
    """
    state.begin_flip(action, version, previous, manifest_hash)
    _set_links(node, version, previous)
    return state.end_flip()


def _set_links(node: Node, version: str, previous: str | None) -> None:
    _replace_link(node.root, "current", f"releases/{version}")
    if previous:
        _replace_link(node.root, "previous", f"releases/{previous}")
    fsync_dir(node.root)


def finish_interrupted_flip(node: Node, state: NodeState) -> None:
    """Complete a flip that the journal shows was started but not recorded."""
    pending = state.pending_flip()
    if pending is None:
        return
    logger.warning(
        "finishing an interrupted %s to %s (previous %s)",
        pending["action"],
        pending["version"],
        pending["previous_version"],
    )
    _set_links(node, pending["version"], pending["previous_version"])
    state.end_flip()


def _replace_link(root: Path, name: str, target: str) -> None:
    temporary = root / f".{name}.{secrets.token_hex(4)}"
    os.symlink(target, temporary)
    try:
        os.replace(temporary, root / name)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


_RENAME_EXCHANGE = 2  # from <linux/fs.h>
_AT_FDCWD = -100


def exchange_paths(first: Path, second: Path) -> None:
    """Swap two folders atomically with renameat2(RENAME_EXCHANGE) (Linux 3.15 and later).

    Raises:
        OSError: the kernel or file system does not support the exchange.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    result = libc.renameat2(
        _AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE
    )
    if result != 0:
        number = ctypes.get_errno()
        raise OSError(number, os.strerror(number), str(first), None, str(second))
