"""The release manifest: the signed description of one release.

``Manifest.to_dict`` returns the signed body and ``Manifest.canonical`` its
RFC 8785 canonical bytes. Those bytes are the content of ``manifest.json``
and what the CMS signature covers. ``Manifest.from_dict`` accepts only a well-formed body:
unknown keys, wrong types and unsafe paths raise ManifestError.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from relman.cas.canonical import canonical_bytes, load_json_bytes, sha256_hex
from relman.cas.errors import InputError, ManifestError
from relman.cas.versions import validate_version

SCHEMA_VERSION = 1

FILE_TYPES = ("executable", "library", "config", "data", "symlink")

# Keys the API envelope adds around the signed body.
ENVELOPE_KEYS = ("manifest_hash", "signature", "signing_certificate", "timestamp_token")

_DIGEST = re.compile(r"[0-9a-f]{64}")
_PERMISSIONS = re.compile(r"0[0-7]{3}")
MAX_PATH_LENGTH = 4096
# NAME_MAX of Linux file systems such as ext4 and XFS.
MAX_NAME_BYTES = 255


def validate_relative_path(path: str) -> str:
    """Return ``path`` if it is a safe relative POSIX path inside a release tree.

    Rejected: empty paths, absolute paths, ``.`` and ``..`` components, empty
    components (``a//b``, a trailing ``/``), backslashes, NUL and other control
    characters. A path that passes cannot name anything outside the tree it is
    joined to, as long as no component on the way is a symlink.
    """
    problem = _path_problem(path)
    if problem:
        raise ManifestError(f"unsafe path {path!r} in manifest: {problem}")
    return path


def _path_problem(path: str) -> str | None:
    if not isinstance(path, str) or not path:
        return "the path is empty"
    if len(path.encode("utf-8", "surrogateescape")) > MAX_PATH_LENGTH:
        return f"the path is longer than {MAX_PATH_LENGTH} bytes"
    if path.startswith("/"):
        return "absolute paths are not allowed"
    if "\\" in path:
        return "backslashes are not allowed"
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in path):
        return "control characters are not allowed"
    for part in path.split("/"):
        if part in ("", ".", ".."):
            return "empty, '.' and '..' components are not allowed"
        if len(part.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
            return f"a component is longer than {MAX_NAME_BYTES} bytes"
    return None


@dataclass(frozen=True)
class ReleaseFile:
    """One file of a release, as the manifest lists it.

    For ``type == "symlink"`` the blob's bytes are the link target (UTF-8),
    a relative path that stays inside the release tree.
    """

    path: str
    type: str
    sha256_hash: str
    size_bytes: int
    permissions: str
    platform: str = "any"
    architecture: str = "any"
    file_signature: str | None = None
    download_url: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def mode(self) -> int:
        return int(self.permissions, 8)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "type": self.type,
            "sha256_hash": self.sha256_hash,
            "size_bytes": self.size_bytes,
            "file_signature": self.file_signature,
            "platform": self.platform,
            "architecture": self.architecture,
            "permissions": self.permissions,
            "download_url": self.download_url,
            "metadata": self.metadata,
        }

    @classmethod
    def from_dict(cls, data: Any) -> ReleaseFile:
        fields = _require_object(data, "file entry", _FILE_FIELDS)
        path = validate_relative_path(_typed(fields, "path", str, "file entry"))
        where = f"file {path!r}"
        entry = cls(
            path=path,
            type=_typed(fields, "type", str, where),
            sha256_hash=_typed(fields, "sha256_hash", str, where),
            size_bytes=_typed(fields, "size_bytes", int, where),
            permissions=_typed(fields, "permissions", str, where),
            platform=_typed(fields, "platform", str, where),
            architecture=_typed(fields, "architecture", str, where),
            file_signature=_typed(fields, "file_signature", (str, type(None)), where),
            download_url=_typed(fields, "download_url", (str, type(None)), where),
            metadata=_typed(fields, "metadata", dict, where),
        )
        entry.check()
        return entry

    def check(self) -> None:
        """Raise ManifestError if a field value is out of range."""
        where = f"file {self.path!r}"
        if self.type not in FILE_TYPES:
            raise ManifestError(
                f"{where}: invalid type {self.type!r}, expected one of {FILE_TYPES}"
            )
        if not _DIGEST.fullmatch(self.sha256_hash):
            raise ManifestError(
                f"{where}: invalid sha256_hash {self.sha256_hash!r}, "
                "expected 64 lowercase hex digits"
            )
        if isinstance(self.size_bytes, bool) or self.size_bytes < 0:
            raise ManifestError(f"{where}: invalid size_bytes {self.size_bytes!r}")
        if not _PERMISSIONS.fullmatch(self.permissions):
            raise ManifestError(
                f"{where}: invalid permissions {self.permissions!r}, "
                "expected four octal digits from 0000 to 0777"
            )


@dataclass(frozen=True)
class Manifest:
    """A release: its identity, notes, build facts and files."""

    version: str
    files: tuple[ReleaseFile, ...]
    tag_name: str = ""
    release_notes: str = ""
    release_date: str = ""
    is_critical: bool = False
    build: dict[str, Any] = field(default_factory=dict)
    dependencies: tuple[str, ...] = ()
    min_upgrade_from: str | None = None
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "version": self.version,
            "tag_name": self.tag_name,
            "release_notes": self.release_notes,
            "release_date": self.release_date,
            "is_critical": self.is_critical,
            "build": self.build,
            "dependencies": list(self.dependencies),
            "min_upgrade_from": self.min_upgrade_from,
            "files": [entry.to_dict() for entry in self.files],
        }

    def canonical(self) -> bytes:
        return canonical_bytes(self.to_dict())

    @property
    def total_size(self) -> int:
        return sum(entry.size_bytes for entry in self.files)

    def file(self, path: str) -> ReleaseFile:
        for entry in self.files:
            if entry.path == path:
                return entry
        raise KeyError(path)

    @classmethod
    def from_dict(cls, data: Any) -> Manifest:
        fields = _require_object(data, "manifest", _MANIFEST_FIELDS)
        schema = _typed(fields, "schema_version", int, "manifest")
        if schema != SCHEMA_VERSION:
            raise ManifestError(
                f"unsupported manifest schema_version {schema!r}: this relman "
                f"reads schema_version {SCHEMA_VERSION}; upgrade relman"
            )
        raw_files = _typed(fields, "files", list, "manifest")
        manifest = cls(
            version=_version_field(fields, "version"),
            files=tuple(ReleaseFile.from_dict(item) for item in raw_files),
            tag_name=_typed(fields, "tag_name", str, "manifest"),
            release_notes=_typed(fields, "release_notes", str, "manifest"),
            release_date=_typed(fields, "release_date", str, "manifest"),
            is_critical=_typed(fields, "is_critical", bool, "manifest"),
            build=_typed(fields, "build", dict, "manifest"),
            dependencies=tuple(_string_list(fields, "dependencies")),
            min_upgrade_from=_optional_version(fields, "min_upgrade_from"),
            schema_version=schema,
        )
        manifest.check_tree()
        return manifest

    def check_tree(self) -> None:
        """Raise ManifestError unless the file paths form a tree that can be built.

        Paths must be unique, no file may sit below another file's path, and a
        symlink target must stay inside the tree.
        """
        seen: set[str] = set()
        for entry in self.files:
            if entry.path in seen:
                raise ManifestError(f"duplicate path {entry.path!r} in manifest")
            seen.add(entry.path)

        for entry in self.files:
            parts = entry.path.split("/")
            for depth in range(1, len(parts)):
                parent = "/".join(parts[:depth])
                if parent in seen:
                    raise ManifestError(
                        f"path {entry.path!r} lies below {parent!r}, which is a "
                        "file or symlink in the same manifest"
                    )


_FILE_FIELDS = frozenset(ReleaseFile("a", "data", "0" * 64, 0, "0644").to_dict())
_MANIFEST_FIELDS = frozenset(Manifest("0.0.0", ()).to_dict())


def manifest_hash(body: bytes) -> str:
    """Return the SHA-256 hex digest of canonical manifest bytes."""
    return sha256_hex(body)


def parse_manifest_bytes(body: bytes) -> Manifest:
    """Parse ``manifest.json`` bytes, which must already be in canonical form."""
    try:
        data = load_json_bytes(body, "manifest")
    except ValueError as error:
        raise ManifestError(str(error)) from error
    manifest = Manifest.from_dict(data)
    if canonical_bytes(data) != body:
        raise ManifestError(
            "manifest bytes are not in RFC 8785 canonical form; regenerate the "
            "manifest with `relman generate` or canonicalise it before signing"
        )
    return manifest


MAX_SYMLINK_EXPANSIONS = 40
MAX_LINK_TARGET_BYTES = 4095


def check_symlinks(targets: dict[str, str]) -> None:
    """Raise ManifestError unless every symlink target stays inside the tree.

    ``targets`` maps each symlink's path to its target. A target must be
    relative. It is then resolved the way the kernel would resolve it in the
    deployed tree: from the link's folder, expanding every component that is
    itself a symlink of the tree, with ``..`` going up from where that
    expansion led. Resolution may never climb above the tree's root, and may
    expand at most MAX_SYMLINK_EXPANSIONS links (the kernel's own limit).
    """
    for link_path, target in targets.items():
        problem = _symlink_problem(link_path, target, targets)
        if problem:
            raise ManifestError(
                f"symlink {link_path!r} -> {target!r} is not allowed: {problem}"
            )


class _Escape(Exception):
    """A symlink target resolved to a place outside the tree, or looped."""


def _symlink_problem(link_path: str, target: str, links: dict[str, str]) -> str | None:
    if not target:
        return "the target is empty"
    if target.startswith("/"):
        return "the target is absolute"
    if any(ord(char) < 0x20 for char in target):
        return "the target contains control characters"
    if len(target.encode("utf-8", "surrogateescape")) > MAX_LINK_TARGET_BYTES:
        return f"the target is longer than {MAX_LINK_TARGET_BYTES} bytes"
    try:
        _resolve(link_path.split("/")[:-1], target, links, [0])
    except _Escape as error:
        return str(error)
    return None


def _resolve(
    folder: list[str], target: str, links: dict[str, str], expansions: list[int]
) -> list[str]:
    """Return the tree position ``target`` names from ``folder``, expanding tree symlinks."""
    position = list(folder)
    for part in target.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not position:
                raise _Escape("the target leaves the release tree")
            position.pop()
            continue
        candidate = "/".join([*position, part])
        if candidate not in links:
            position.append(part)
            continue
        expansions[0] += 1
        if expansions[0] > MAX_SYMLINK_EXPANSIONS:
            raise _Escape(
                f"resolving it expands more than {MAX_SYMLINK_EXPANSIONS} symlinks"
            )
        if links[candidate].startswith("/"):
            raise _Escape(f"it passes through {candidate!r}, whose target is absolute")
        position = _resolve(position, links[candidate], links, expansions)
    return position


def _require_object(data: Any, what: str, allowed: frozenset[str]) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ManifestError(f"{what} must be a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ManifestError(f"{what} has unknown keys {unknown}")
    missing = sorted(allowed - set(data))
    if missing:
        raise ManifestError(f"{what} is missing keys {missing}")
    return data


def _typed(fields: dict[str, Any], key: str, kind: Any, where: str) -> Any:
    value = fields[key]
    # bool is a subclass of int, but a JSON true is never a size or a count.
    wrong_bool = isinstance(value, bool) and kind is int
    if wrong_bool or not isinstance(value, kind):
        raise ManifestError(f"{where}: field {key!r} has invalid value {value!r}")
    return value


def _string_list(fields: dict[str, Any], key: str) -> list[str]:
    values = _typed(fields, key, list, "manifest")
    if not all(isinstance(value, str) for value in values):
        raise ManifestError(f"manifest: every entry of {key!r} must be a string")
    return values


def _version_field(fields: dict[str, Any], key: str) -> str:
    value = _typed(fields, key, str, "manifest")
    try:
        return validate_version(value)
    except InputError as error:
        raise ManifestError(f"manifest field {key!r}: {error}") from error


def _optional_version(fields: dict[str, Any], key: str) -> str | None:
    if fields[key] is None:
        return None
    return _version_field(fields, key)
