"""Content-addressed blob store: ``objects/sha256/<2 hex>/<62 hex>``.

A blob is written to a temporary file, hashed while it is written, fsynced
and renamed into place only when its bytes match the digest it was announced
with. So a visible blob always matches its name, and callers may treat
``has(digest)`` as "present and verified". Blobs are read-only (0444).

Temporary files live in ``tmp/`` next to ``objects/``, on the same file
system, so the rename is atomic. They hold unverified bytes: a web server
that serves the repository folder as static files must not serve ``tmp/``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from relman.cas.errors import InputError, IntegrityError
from relman.cas.fsutil import fsync_dir

logger = logging.getLogger(__name__)

BLOB_MODE = 0o444
CHUNK_SIZE = 1024 * 1024
_DIGEST = re.compile(r"[0-9a-f]{64}")


def check_digest(digest: str) -> str:
    """Return ``digest`` if it is 64 lowercase hex digits, else raise InputError."""
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise InputError(
            f"invalid SHA-256 digest {digest!r}: expected 64 lowercase hex digits"
        )
    return digest


def blob_relative_path(digest: str) -> str:
    """Return the repository-relative path of a blob, as mirrors serve it."""
    check_digest(digest)
    return f"objects/sha256/{digest[:2]}/{digest[2:]}"


class BlobWriter:
    """A blob being written: bytes go to a temporary file and into a running hash."""

    def __init__(
        self, stream: BinaryIO, expected_digest: str, expected_size: int | None
    ):
        self._stream = stream
        self._hash = hashlib.sha256()
        self.expected_digest = expected_digest
        self.expected_size = expected_size
        self.size = 0

    def write(self, data: bytes) -> None:
        if (
            self.expected_size is not None
            and self.size + len(data) > self.expected_size
        ):
            raise IntegrityError(
                f"blob {self.expected_digest} is larger than its declared size of "
                f"{self.expected_size} bytes; the source is corrupt or was changed"
            )
        self._stream.write(data)
        self._hash.update(data)
        self.size += len(data)

    def verify(self) -> None:
        if self.expected_size is not None and self.size != self.expected_size:
            raise IntegrityError(
                f"blob {self.expected_digest}: got {self.size} bytes, "
                f"expected {self.expected_size}"
            )
        actual = self._hash.hexdigest()
        if actual != self.expected_digest:
            raise IntegrityError(
                f"blob content does not match its SHA-256: expected "
                f"{self.expected_digest}, got {actual}"
            )


class BlobStore:
    """The ``objects/`` tree of one repository folder."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.objects = self.root / "objects" / "sha256"
        self.temporary = self.root / "tmp"
        self._touched: set[Path] = set()

    def path(self, digest: str) -> Path:
        check_digest(digest)
        return self.objects / digest[:2] / digest[2:]

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def size(self, digest: str) -> int:
        return self.path(digest).stat().st_size

    @contextmanager
    def writer(self, digest: str, size: int | None = None) -> Iterator[BlobWriter]:
        """Write a blob that must hash to ``digest``; it appears only if it does.

        Raises:
            IntegrityError: the bytes written exceed ``size``, fall short of it,
                or do not hash to ``digest``. Nothing is left behind.
        """
        target = self.path(digest)
        self.temporary.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(
            prefix=digest[:16] + ".", dir=self.temporary
        )
        try:
            with os.fdopen(descriptor, "wb") as stream:
                writer = BlobWriter(stream, digest, size)
                yield writer
                writer.verify()
                stream.flush()
                os.fchmod(stream.fileno(), BLOB_MODE)
                os.fsync(stream.fileno())
            self.commit(Path(temporary), target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    def commit(self, verified_file: Path, target: Path) -> None:
        """Rename a verified temporary file into place as a read-only blob."""
        target.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(verified_file, BLOB_MODE)
        os.replace(verified_file, target)
        self._touched.add(target.parent)

    def add_file(self, source: str | Path, digest: str, size: int) -> bool:
        """Copy ``source`` into the store; return False if the blob was present."""
        if self.has(digest):
            return False
        with open(source, "rb") as stream, self.writer(digest, size) as writer:
            while chunk := stream.read(CHUNK_SIZE):
                writer.write(chunk)
        return True

    def add_bytes(self, data: bytes, digest: str) -> bool:
        """Store ``data`` under ``digest``; return False if the blob was present."""
        if self.has(digest):
            return False
        with self.writer(digest, len(data)) as writer:
            writer.write(data)
        return True

    def read_bytes(self, digest: str) -> bytes:
        return self.path(digest).read_bytes()

    def sync(self) -> None:
        """Fsync every folder a blob was renamed into since the last call."""
        for folder in sorted(self._touched):
            fsync_dir(folder)
        if self._touched:
            fsync_dir(self.objects)
        self._touched.clear()

    def digests(self) -> Iterator[str]:
        """Yield the digest of every blob present."""
        if not self.objects.is_dir():
            return
        for prefix in sorted(os.listdir(self.objects)):
            for rest in sorted(os.listdir(self.objects / prefix)):
                digest = prefix + rest
                if _DIGEST.fullmatch(digest):
                    yield digest

    def clear_temporary(self) -> None:
        """Remove temporary files that a crashed writer left behind."""
        if self.temporary.is_dir():
            shutil.rmtree(self.temporary)
