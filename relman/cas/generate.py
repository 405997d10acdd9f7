"""Build a manifest from a release folder."""

from __future__ import annotations

import base64
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

from relman.cas.cms import load_signer, sign_digest
from relman.cas.errors import InputError
from relman.cas.manifest import Manifest
from relman.cas.scan import scan_release
from relman.cas.versions import validate_version


@dataclass
class ReleaseInfo:
    """Release facts that do not come from the files themselves."""

    version: str
    tag_name: str | None = None
    release_notes: str = ""
    release_date: str | None = None
    is_critical: bool = False
    build: dict[str, str] = field(default_factory=dict)
    dependencies: list[str] = field(default_factory=list)
    min_upgrade_from: str | None = None


def build_manifest(
    release_dir: str | Path,
    info: ReleaseInfo,
    exclude: Iterable[str] = (),
    threads: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> Manifest:
    """Scan ``release_dir`` and return its manifest.

    The release date defaults to SOURCE_DATE_EPOCH when set, else to the
    newest modification time in the tree, so that the same tree gives the
    same manifest bytes.
    """
    validate_version(info.version)
    if info.min_upgrade_from is not None:
        try:
            validate_version(info.min_upgrade_from)
        except InputError as error:
            raise InputError(f"--min-upgrade-from: {error}") from error
    files = scan_release(release_dir, exclude, threads, progress)
    if not files:
        raise InputError(f"release folder {str(release_dir)!r} contains no files")
    release_date = info.release_date or _default_release_date(Path(release_dir), files)
    manifest = Manifest(
        version=info.version,
        files=tuple(files),
        tag_name=info.tag_name if info.tag_name is not None else f"v{info.version}",
        release_notes=info.release_notes,
        release_date=release_date,
        is_critical=info.is_critical,
        build=dict(info.build),
        dependencies=tuple(info.dependencies),
        min_upgrade_from=info.min_upgrade_from,
    )
    manifest.check_tree()
    return manifest


def sign_files(
    manifest: Manifest, key_path: str | Path, cert_path: str | Path
) -> Manifest:
    """Return ``manifest`` with a detached CMS signature (base64 DER) in every file_signature.

    Each signature covers the file's bytes through the SHA-256 the manifest
    records, so no file is read again.
    """
    key, certificates = load_signer(key_path, cert_path)
    signed = [
        replace(
            entry,
            file_signature=base64.b64encode(
                sign_digest(
                    bytes.fromhex(entry.sha256_hash), "sha256", key, certificates
                )
            ).decode("ascii"),
        )
        for entry in manifest.files
    ]
    return replace(manifest, files=tuple(signed))


def parse_release_date(text: str) -> str:
    """Normalise an ISO 8601 date-time to UTC ``YYYY-MM-DDTHH:MM:SSZ``."""
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as error:
        raise InputError(
            f"invalid release date {text!r}: expected ISO 8601 such as 2026-03-01T12:00:00Z"
        ) from error
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return _format(moment)


def _default_release_date(root: Path, files: list) -> str:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch:
        try:
            return _format(datetime.fromtimestamp(int(epoch), UTC))
        except ValueError as error:
            raise InputError(
                f"invalid SOURCE_DATE_EPOCH {epoch!r}: expected whole seconds"
            ) from error
    newest = max(os.lstat(root / entry.path).st_mtime for entry in files)
    return _format(datetime.fromtimestamp(int(newest), UTC))


def _format(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
