"""HTTP downloads from a mirror: JSON documents and blobs with resume.

A blob download writes to ``store/tmp/partial/<digest>`` and hashes while it
writes. An interrupted download resumes from the partial file with a Range
request guarded by If-Range, so a blob that changed on the mirror in between
is fetched whole again. A download stops as soon as it passes the size the
manifest declares, and the bytes reach the store only if they match the
digest.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp

from relman.cas.blobstore import BlobStore, blob_relative_path
from relman.cas.canonical import load_json_bytes
from relman.cas.errors import FetchError, IntegrityError

logger = logging.getLogger(__name__)

CHUNK_SIZE = 256 * 1024
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


@dataclass
class DownloadStats:
    """Bytes received from the mirror during one pull."""

    bytes_received: int = 0
    blobs_fetched: int = 0
    resumed: int = 0
    retries: int = 0


@dataclass
class _Partial:
    """One partial download on disk: its bytes and the ETag they came with."""

    path: Path
    etag_path: Path
    hasher: Any = None

    def begin(self, offset: int) -> None:
        """Start the running hash with the ``offset`` bytes already on disk."""
        self.hasher = hashlib.sha256()
        if not offset:
            return
        with open(self.path, "rb") as stream:
            remaining = offset
            while remaining:
                chunk = stream.read(min(remaining, 1024 * 1024))
                if not chunk:
                    break
                self.hasher.update(chunk)
                remaining -= len(chunk)

    @property
    def size(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    @property
    def etag(self) -> str | None:
        try:
            return self.etag_path.read_text().strip() or None
        except FileNotFoundError:
            return None

    def remember_etag(self, etag: str | None) -> None:
        if etag:
            self.etag_path.write_text(etag)

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)
        self.etag_path.unlink(missing_ok=True)


def stream_flush_and_sync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def mirror_url(base: str, path: str) -> str:
    return base.rstrip("/") + "/" + path


async def get_json(session: aiohttp.ClientSession, base: str, path: str) -> Any:
    """GET a JSON document, raising FetchError with the mirror's message on failure."""
    url = mirror_url(base, path)
    try:
        async with session.get(url) as response:
            body = await response.read()
            if response.status != 200:
                raise FetchError(
                    f"GET {url} failed with HTTP {response.status}: {_error_text(body)}"
                )
    except aiohttp.ClientError as error:
        raise FetchError(
            f"GET {url} failed: {error}; check --mirror and that the mirror runs"
        ) from error
    try:
        return load_json_bytes(body, f"response of {url}")
    except ValueError as error:
        raise FetchError(str(error)) from error


def _error_text(body: bytes) -> str:
    try:
        data = load_json_bytes(body, "error")
        if isinstance(data, dict) and "error" in data:
            return str(data["error"])
    except ValueError:
        pass
    return body[:200].decode("utf-8", "replace")


def manifest_path(version: str | None) -> str:
    return "api/updates/manifests/" + (quote(version, safe="") if version else "latest")


class BlobFetcher:
    """Downloads blobs from one mirror into one store."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        store: BlobStore,
        retries: int = 3,
        progress: Callable[[int], None] | None = None,
    ):
        self.session = session
        self.base_url = base_url
        self.store = store
        self.retries = retries
        self.progress = progress
        self.stats = DownloadStats()
        self.partial_dir = store.temporary / "partial"

    async def fetch(self, digest: str, size: int) -> None:
        """Download one blob into the store, resuming and retrying on transport errors.

        Raises:
            IntegrityError: the mirror sent more bytes than ``size`` or bytes
                that do not hash to ``digest``.
            FetchError: the mirror responded with an error status, or every
                attempt failed.
        """
        if self.store.has(digest):
            return
        self.partial_dir.mkdir(parents=True, exist_ok=True)
        partial = _Partial(
            self.partial_dir / digest, self.partial_dir / f"{digest}.etag"
        )
        url = mirror_url(self.base_url, blob_relative_path(digest))
        for attempt in range(1, self.retries + 1):
            try:
                await self._attempt(url, partial, digest, size)
                break
            except (TimeoutError, aiohttp.ClientError, ConnectionError) as error:
                if attempt == self.retries:
                    raise FetchError(
                        f"download of {url} failed after {attempt} attempts: {error!r}; "
                        "run the pull again to resume it"
                    ) from error
                self.stats.retries += 1
                logger.warning(
                    "download of %s failed (%r); retry %d of %d",
                    url,
                    error,
                    attempt,
                    self.retries - 1,
                )
                await asyncio.sleep(0.2 * attempt)
        await asyncio.to_thread(self._commit, partial, digest, size)
        self.stats.blobs_fetched += 1

    async def _attempt(
        self, url: str, partial: _Partial, digest: str, size: int
    ) -> None:
        offset = partial.size
        if offset > size:
            partial.discard()
            offset = 0
        if offset == size and size > 0:
            partial.begin(offset)
            return
        headers = {}
        if offset:
            headers["Range"] = f"bytes={offset}-"
            if partial.etag:
                headers["If-Range"] = partial.etag
        async with self.session.get(url, headers=headers) as response:
            start = self._start_offset(response, url, offset, size, partial)
            partial.begin(offset if start is None else start)
            if start is None:
                return
            offset = start
            partial.remember_etag(response.headers.get("ETag"))
            if offset:
                self.stats.resumed += 1
            await self._receive(response, partial, offset, size, url)

    def _start_offset(
        self, response, url: str, offset: int, size: int, partial: _Partial
    ) -> int | None:  # noqa: ANN001
        """Return where the response body starts in the blob, or None if nothing is to read."""
        if response.status == 200:
            if offset:
                logger.info(
                    "mirror sent all of %s instead of a range; starting over", url
                )
            partial.discard()
            return 0
        if response.status == 206:
            match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", ""))
            if not match or int(match.group(1)) != offset:
                partial.discard()
                raise FetchError(
                    f"mirror responded to the range request for {url} with Content-Range "
                    f"{response.headers.get('Content-Range')!r}, expected start {offset}"
                )
            return offset
        if response.status == 416 and offset == size:
            return None
        if response.status == 416:
            partial.discard()
            raise aiohttp.ClientPayloadError(
                f"range not satisfiable at {offset}; restarting"
            )
        raise FetchError(f"GET {url} failed with HTTP {response.status}")

    async def _receive(
        self, response, partial: _Partial, offset: int, size: int, url: str
    ) -> None:  # noqa: ANN001
        mode = "ab" if offset else "wb"
        with open(partial.path, mode) as stream:
            written = offset
            async for chunk in response.content.iter_chunked(CHUNK_SIZE):
                if written + len(chunk) > size:
                    stream.close()
                    partial.discard()
                    raise IntegrityError(
                        f"mirror sent more than the declared {size} bytes for {url}; "
                        "the blob on the mirror is corrupt"
                    )
                stream.write(chunk)
                partial.hasher.update(chunk)
                written += len(chunk)
                self.stats.bytes_received += len(chunk)
                if self.progress:
                    self.progress(len(chunk))
        if written < size:
            raise aiohttp.ClientPayloadError(
                f"connection closed after {written} of {size} bytes"
            )
        stream_flush_and_sync(partial.path)

    def _commit(self, partial: _Partial, digest: str, size: int) -> None:
        """Rename the finished partial file into the store if its hash matches."""
        if partial.hasher is None:
            partial.begin(partial.size)
        actual = partial.hasher.hexdigest()
        if actual != digest or partial.size != size:
            partial.discard()
            raise IntegrityError(
                f"blob from the mirror does not match the manifest: expected sha256 "
                f"{digest}, got {actual}; the mirror's copy is corrupt or was altered"
            )
        partial.etag_path.unlink(missing_ok=True)
        self.store.commit(partial.path, self.store.path(digest))
