"""A repository folder: the one layout shared by publishers, mirrors, nodes and bundles.

config.json                               format name and version
index.json                                catalog of versions
manifests/<version>/manifest.json         canonical manifest, the signed bytes
manifests/<version>/manifest.json.sig     detached CMS SignedData, DER
manifests/<version>/manifest.json.tsr     RFC 3161 timestamp token, optional
objects/sha256/<2 hex>/<62 hex>           blobs
index.sqlite                              local index, never served
tmp/                                      unverified temporary files, never served
"""

from __future__ import annotations

import base64
import fcntl
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from relman.cas.blobstore import BlobStore
from relman.cas.canonical import canonical_bytes, load_json_bytes, sha256_hex
from relman.cas.cms import parse_embedded_certificates
from relman.cas.errors import (
    ConflictError,
    InputError,
    IntegrityError,
    ManifestError,
    SignatureError,
)
from relman.cas.fsutil import atomic_write_bytes, fsync_dir
from relman.cas.index import INDEX_NAME, RepositoryIndex, utc_now
from relman.cas.manifest import Manifest, ReleaseFile, parse_manifest_bytes
from relman.cas.pki import certificate_pem
from relman.cas.scan import read_link_target
from relman.cas.versions import sort_versions, validate_version

logger = logging.getLogger(__name__)

FORMAT_NAME = "relman-repository"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.json.sig"
TIMESTAMP_NAME = "manifest.json.tsr"
INDEX_EXPIRY = timedelta(days=30)


@dataclass(frozen=True)
class StoredRelease:
    """The files of one version as they lie in a repository."""

    manifest: Manifest
    body: bytes
    signature: bytes
    timestamp: bytes | None

    @property
    def manifest_hash(self) -> str:
        return sha256_hex(self.body)


class Repository:
    """A repository folder on disk."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.blobs = BlobStore(self.root)

    @classmethod
    def create(cls, root: str | Path) -> Repository:
        """Open the repository at ``root``, creating its folders and config if missing."""
        repository = cls(root)
        _check_new_repository_folder(repository.root)
        repository.root.mkdir(parents=True, exist_ok=True)
        (repository.root / "manifests").mkdir(exist_ok=True)
        (repository.root / "objects" / "sha256").mkdir(parents=True, exist_ok=True)
        config = repository.root / "config.json"
        if not config.exists():
            atomic_write_bytes(
                config,
                canonical_bytes({"format": FORMAT_NAME, "version": FORMAT_VERSION}),
            )
        repository.check_format()
        return repository

    @classmethod
    def open(cls, root: str | Path) -> Repository:
        """Open an existing repository, raising InputError if ``root`` is not one."""
        repository = cls(root)
        repository.check_format()
        return repository

    def check_format(self) -> None:
        config = self.root / "config.json"
        try:
            data = load_json_bytes(config.read_bytes(), str(config))
        except FileNotFoundError as error:
            raise InputError(
                f"{str(self.root)!r} is not a relman repository: config.json is missing"
            ) from error
        except OSError as error:
            raise InputError(
                f"cannot read {str(config)!r}: {error.strerror}; pass the path of a "
                "repository folder"
            ) from error
        except ValueError as error:
            raise InputError(str(error)) from error
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            raise InputError(f"{str(config)!r} does not describe a relman repository")
        if data.get("version") != FORMAT_VERSION:
            raise InputError(
                f"repository {str(self.root)!r} has format version {data.get('version')!r}; "
                f"this relman reads version {FORMAT_VERSION}"
            )

    def index(self) -> RepositoryIndex:
        return RepositoryIndex(self.root / INDEX_NAME)

    def release_folder(self, version: str) -> Path:
        return self.root / "manifests" / validate_version(version)

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold an exclusive lock on the repository for a write."""
        with open(self.root / ".lock", "a+b") as stream:
            fcntl.flock(stream.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(stream.fileno(), fcntl.LOCK_UN)

    # Reading.

    def versions(self) -> list[str]:
        """Return the versions whose manifest and signature are present, lowest first."""
        folder = self.root / "manifests"
        if not folder.is_dir():
            return []
        found = []
        for name in os.listdir(folder):
            if name.startswith("."):
                continue  # a release being written by store_release
            if (folder / name / MANIFEST_NAME).is_file() and (
                folder / name / SIGNATURE_NAME
            ).is_file():
                try:
                    found.append(validate_version(name))
                except InputError:
                    logger.warning(
                        "skipping manifests/%s: not a valid version name", name
                    )
        return sort_versions(found)

    def has_release(self, version: str) -> bool:
        return (self.release_folder(version) / MANIFEST_NAME).is_file()

    def load_release(self, version: str) -> StoredRelease:
        """Read the manifest, signature and timestamp of ``version``.

        Raises:
            InputError: the version string is invalid.
            KeyError: the version is not in this repository.
            ManifestError: the stored manifest is malformed or its version
                differs from its folder name.
        """
        folder = self.release_folder(version)
        try:
            body = (folder / MANIFEST_NAME).read_bytes()
            signature = (folder / SIGNATURE_NAME).read_bytes()
        except FileNotFoundError as error:
            raise KeyError(version) from error
        timestamp_path = folder / TIMESTAMP_NAME
        timestamp = timestamp_path.read_bytes() if timestamp_path.is_file() else None
        manifest = parse_manifest_bytes(body)
        if manifest.version != version:
            raise ManifestError(
                f"manifests/{version}/manifest.json declares version {manifest.version!r}"
            )
        return StoredRelease(manifest, body, signature, timestamp)

    def envelope(self, version: str) -> dict[str, Any]:
        """Return the API envelope: the signed body plus hash, signature, certificate, token."""
        release = self.load_release(version)
        try:
            certificates = parse_embedded_certificates(release.signature)
        except SignatureError:
            certificates = []
        envelope = release.manifest.to_dict()
        envelope["manifest_hash"] = release.manifest_hash
        envelope["signature"] = base64.b64encode(release.signature).decode("ascii")
        envelope["signing_certificate"] = (
            certificate_pem(certificates[0]).decode("ascii") if certificates else None
        )
        envelope["timestamp_token"] = (
            base64.b64encode(release.timestamp).decode("ascii")
            if release.timestamp
            else None
        )
        return envelope

    # Writing.

    def store_release(
        self,
        body: bytes,
        signature: bytes,
        timestamp: bytes | None = None,
    ) -> bool:
        """Make a release visible; every blob it names must already be present.

        Returns False when the same manifest is already stored (a no-op).

        Raises:
            ConflictError: the version is stored with a different manifest.
            IntegrityError: a blob the manifest names is missing.
        """
        manifest = parse_manifest_bytes(body)
        folder = self.release_folder(manifest.version)
        if (folder / MANIFEST_NAME).is_file():
            existing = (folder / MANIFEST_NAME).read_bytes()
            if existing == body:
                return False
            raise ConflictError(
                f"version {manifest.version} is already published with manifest "
                f"{sha256_hex(existing)}, not {sha256_hex(body)}; publish the new "
                "content under a new version"
            )
        missing = [
            entry.path
            for entry in manifest.files
            if not self.blobs.has(entry.sha256_hash)
        ]
        if missing:
            raise IntegrityError(
                f"cannot store version {manifest.version}: {len(missing)} blobs are "
                f"missing, first {missing[0]!r}"
            )
        self.blobs.sync()

        # Write the folder under a temporary name, then rename it into place,
        # so a reader sees all of the release's files or none of them.
        staging = Path(
            tempfile.mkdtemp(prefix=f".{manifest.version}.", dir=folder.parent)
        )
        try:
            atomic_write_bytes(staging / MANIFEST_NAME, body)
            atomic_write_bytes(staging / SIGNATURE_NAME, signature)
            if timestamp is not None:
                atomic_write_bytes(staging / TIMESTAMP_NAME, timestamp)
            os.chmod(staging, 0o755)
            os.rename(staging, folder)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        fsync_dir(folder.parent)

        with self.index() as index:
            index.record_release(manifest, sha256_hex(body))
        return True

    def import_blobs(
        self,
        manifest: Manifest,
        release_dir: str | Path,
        progress: Callable[[int], None] | None = None,
    ) -> int:
        """Copy the blobs of ``manifest`` from ``release_dir``; return the bytes copied.

        Raises:
            IntegrityError: a file differs from the manifest (changed since
                ``relman generate``); no blob of that file is stored.
            InputError: a file is missing from ``release_dir``.
        """
        source = Path(release_dir)
        copied = 0
        for entry in manifest.files:
            if self.blobs.has(entry.sha256_hash):
                if progress:
                    progress(entry.size_bytes)
                continue
            try:
                copied += self._import_one(source, entry)
            except FileNotFoundError as error:
                raise InputError(
                    f"{entry.path!r} is listed in the manifest but missing from "
                    f"{str(source)!r}; pass the folder the manifest was generated from"
                ) from error
            except IntegrityError as error:
                raise IntegrityError(
                    f"{entry.path!r} in {str(source)!r} does not match the manifest "
                    f"({error}); it changed after `relman generate`, so regenerate "
                    "and re-sign the manifest"
                ) from error
            if progress:
                progress(entry.size_bytes)
        self.blobs.sync()
        return copied

    def _import_one(self, source: Path, entry: ReleaseFile) -> int:
        path = source / entry.path
        if entry.type == "symlink":
            target = read_link_target(source, entry.path).encode(
                "utf-8", "surrogateescape"
            )
            if sha256_hex(target) != entry.sha256_hash:
                raise IntegrityError(f"symlink target {target!r} differs")
            self.blobs.add_bytes(target, entry.sha256_hash)
            return len(target)
        if path.is_symlink():
            raise IntegrityError("it is a symlink, the manifest lists a file")
        self.blobs.add_file(path, entry.sha256_hash, entry.size_bytes)
        return entry.size_bytes

    def write_catalog(self) -> dict[str, Any]:
        """Rewrite ``index.json``: every version, its manifest hash, a sequence, an expiry.

        The sequence number grows by one with every write.
        """
        path = self.root / "index.json"
        sequence = 0
        if path.is_file():
            try:
                sequence = int(json.loads(path.read_bytes()).get("sequence", 0))
            except (ValueError, AttributeError):
                logger.warning("index.json is unreadable; restarting its sequence at 1")
        now = datetime.now(UTC)
        releases = []
        for version in self.versions():
            release = self.load_release(version)
            releases.append(
                {
                    "version": version,
                    "manifest_hash": release.manifest_hash,
                    "release_date": release.manifest.release_date,
                    "is_critical": release.manifest.is_critical,
                }
            )
        catalog = {
            "format": FORMAT_NAME,
            "sequence": sequence + 1,
            "generated_at": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "expires": (now + INDEX_EXPIRY).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "versions": releases,
        }
        atomic_write_bytes(path, canonical_bytes(catalog))
        return catalog

    def reindex(self) -> int:
        """Rebuild ``index.sqlite`` from the manifest files; return the release count."""
        with self.index() as index:
            index.clear()
            versions = self.versions()
            for version in versions:
                release = self.load_release(version)
                index.record_release(release.manifest, release.manifest_hash)
        logger.info(
            "reindexed %d releases in %s at %s", len(versions), self.root, utc_now()
        )
        return len(versions)


def _check_new_repository_folder(root: Path) -> None:
    """Raise InputError unless ``root`` is a repository, an empty folder, or absent."""
    if (root / "config.json").is_file():
        return
    if root.exists() and not root.is_dir():
        raise InputError(
            f"repository path {str(root)!r} is not a folder; pass a folder for --repo"
        )
    if root.is_dir() and any(root.iterdir()):
        raise InputError(
            f"{str(root)!r} exists and is not a relman repository (no config.json); "
            "pass an empty or new folder for --repo"
        )
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(
            f"cannot create repository folder {str(root)!r}: {error.strerror}"
        ) from error
