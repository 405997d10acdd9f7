"""Scan a release folder into manifest file entries.

Entries are sorted by path, so the same tree always gives the same entries.
Hashing runs on a thread pool; hashlib releases the GIL while it hashes, so
threads use several cores.

Symlinks are recorded, not followed: an entry of type ``symlink`` whose blob
contains the link target. A target must be relative and stay inside the folder;
an absolute target that points inside the folder is rewritten as the
equivalent relative one. Sockets, devices, fifos and symlinks that leave the
folder raise InputError naming the path. Empty folders are not recorded.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import stat
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from relman.cas.binary import read_binary_info
from relman.cas.canonical import sha256_hex
from relman.cas.errors import InputError, ManifestError
from relman.cas.hashing import sha256_file
from relman.cas.manifest import ReleaseFile, check_symlinks, validate_relative_path

logger = logging.getLogger(__name__)

_LIBRARY_SUFFIXES = (".so", ".dll", ".dylib", ".pyd", ".a", ".lib")
_CONFIG_SUFFIXES = (
    ".conf",
    ".cfg",
    ".ini",
    ".toml",
    ".yaml",
    ".yml",
    ".json",
    ".xml",
    ".properties",
    ".env",
)
_CONFIG_FOLDERS = ("etc", "config", "conf")


@dataclass(frozen=True)
class _Found:
    relative: str
    absolute: Path
    mode: int
    link_target: str | None


def scan_release(
    root: str | Path,
    exclude: Iterable[str] = (),
    threads: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[ReleaseFile]:
    """Return the manifest entries for every file and symlink below ``root``.

    Args:
        root: the release folder.
        exclude: glob patterns matched against each relative path and each
            path component (``__pycache__``, ``*.pyc``, ``docs/*``).
        threads: hashing threads; default: the number of CPUs.
        progress: called with the byte count of each file once it is hashed.

    Raises:
        InputError: ``root`` is not a folder, or contains a file of a kind that
            cannot be released or a symlink that leaves it.
    """
    root_path = Path(root)
    if not root_path.is_dir():
        raise InputError(
            f"release folder {str(root)!r} does not exist or is not a folder"
        )
    found = sorted(_walk(root_path, tuple(exclude)), key=lambda item: item.relative)
    workers = threads or os.cpu_count() or 2
    with ThreadPoolExecutor(max_workers=workers) as pool:
        entries = list(pool.map(lambda item: _describe(item, progress), found))

    targets = {
        entry.path: item.link_target
        for entry, item in zip(entries, found, strict=True)
        if item.link_target is not None
    }
    try:
        check_symlinks(targets)
    except ManifestError as error:
        raise InputError(str(error)) from error
    logger.debug("scanned %d entries below %s", len(entries), root_path)
    return entries


def _walk(root: Path, exclude: tuple[str, ...]) -> Iterable[_Found]:
    """Yield files and symlinks below ``root``."""
    pending = [""]
    while pending:
        folder = pending.pop()
        names = sorted(os.listdir(root / folder) if folder else os.listdir(root))
        subfolders = []
        for name in names:
            relative = f"{folder}/{name}" if folder else name
            if _excluded(relative, exclude):
                continue
            found = _classify(root, relative)
            if found is None:
                subfolders.append(relative)
            else:
                yield found
        pending.extend(subfolders)


def _excluded(relative: str, patterns: tuple[str, ...]) -> bool:
    name = relative.rsplit("/", 1)[-1]
    return any(
        fnmatch.fnmatchcase(relative, pattern) or fnmatch.fnmatchcase(name, pattern)
        for pattern in patterns
    )


def _classify(root: Path, relative: str) -> _Found | None:
    """Return a file or symlink entry, None for a folder; raise for anything else."""
    try:
        validate_relative_path(relative)
    except ManifestError as error:
        raise InputError(str(error)) from error
    absolute = root / relative
    info = absolute.lstat()
    if stat.S_ISDIR(info.st_mode):
        return None
    if stat.S_ISREG(info.st_mode):
        return _Found(relative, absolute, stat.S_IMODE(info.st_mode), None)
    if stat.S_ISLNK(info.st_mode):
        target = read_link_target(root, relative)
        return _Found(relative, absolute, 0o777, target)
    kind = _special_kind(info.st_mode)
    raise InputError(
        f"cannot release {relative!r} in {str(root)!r}: it is a {kind}; "
        "only regular files, folders and symlinks can be released "
        "(remove it or pass --exclude)"
    )


def _special_kind(mode: int) -> str:
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISCHR(mode):
        return "character device"
    if stat.S_ISBLK(mode):
        return "block device"
    return "special file"


def read_link_target(root: Path, relative: str) -> str:
    """Return the target of the symlink ``root/relative`` as the manifest records it.

    A relative target is returned unchanged. An absolute target inside
    ``root`` becomes the equivalent relative target; any other raises InputError.
    """
    target = os.readlink(root / relative)
    if not target.startswith("/"):
        return target
    real_root = os.path.realpath(root)
    absolute_target = os.path.normpath(target)
    if os.path.commonpath([real_root, absolute_target]) != real_root:
        raise InputError(
            f"symlink {relative!r} points to {target!r}, outside the release "
            f"folder {str(root)!r}; make it point inside or exclude it"
        )
    link_folder = os.path.dirname(os.path.join(real_root, relative))
    return os.path.relpath(absolute_target, link_folder)


def _describe(found: _Found, progress: Callable[[int], None] | None) -> ReleaseFile:
    if found.link_target is not None:
        data = found.link_target.encode("utf-8", "surrogateescape")
        entry = ReleaseFile(
            path=found.relative,
            type="symlink",
            sha256_hash=sha256_hex(data),
            size_bytes=len(data),
            permissions="0777",
        )
    else:
        entry = _describe_file(found)
    if progress:
        progress(entry.size_bytes)
    return entry


def _describe_file(found: _Found) -> ReleaseFile:
    digest, size = sha256_file(found.absolute)
    with open(found.absolute, "rb") as stream:
        binary = read_binary_info(stream)
    platform = binary.platform if binary else "any"
    architecture = binary.architecture if binary else "any"
    return ReleaseFile(
        path=found.relative,
        type=_file_type(
            found, binary.is_library if binary else False, binary is not None
        ),
        sha256_hash=digest,
        size_bytes=size,
        permissions=f"{found.mode & 0o777:04o}",
        platform=platform,
        architecture=architecture,
    )


def _file_type(found: _Found, is_library: bool, is_binary: bool) -> str:
    """Classify by name first, then by header and mode bits."""
    name = found.relative.rsplit("/", 1)[-1].lower()
    if name.endswith(_LIBRARY_SUFFIXES) or ".so." in name:
        return "library"
    if is_binary and is_library and not found.mode & 0o111:
        return "library"
    if found.mode & 0o111:
        return "executable"
    top = found.relative.split("/", 1)[0]
    if name.endswith(_CONFIG_SUFFIXES) or (
        top in _CONFIG_FOLDERS and "/" in found.relative
    ):
        return "config"
    return "data"
