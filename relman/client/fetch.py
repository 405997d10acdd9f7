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
import time
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
# The largest manifest envelope relman reads: about 250,000 files with a
# per-file signature each. An estimate, not a protocol limit.
MAX_DOCUMENT_BYTES = 512 * 1024 * 1024
DOCUMENT_TIMEOUT_SECONDS = 300
# A transfer that delivers less than MIN_BYTES_PER_WINDOW in WINDOW_SECONDS is
# cut and retried, like curl's --speed-limit and --speed-time.
MIN_BYTES_PER_WINDOW = 1024
WINDOW_SECONDS = 60.0
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
    resumed: bool = False

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
        """Keep a strong ETag for If-Range; anything else means no resume later."""
        if etag and etag.isascii() and etag.isprintable() and not etag.startswith("W/"):
            self.etag_path.write_text(etag)
        else:
            self.etag_path.unlink(missing_ok=True)

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
    """GET a JSON document, raising FetchError with the mirror's message on failure.

    The body may be at most MAX_DOCUMENT_BYTES long and must arrive within
    DOCUMENT_TIMEOUT_SECONDS, so a hostile mirror cannot exhaust memory or
    stall the pull before the signature is checked.
    """
    url = mirror_url(base, path)
    try:
        timeout = aiohttp.ClientTimeout(total=DOCUMENT_TIMEOUT_SECONDS)
        async with session.get(url, timeout=timeout, allow_redirects=False) as response:
            _reject_redirect(response, url)
            body = await _read_limited(response, MAX_DOCUMENT_BYTES, url)
            if response.status != 200:
                hint = _status_hint(response.status, body)
                raise FetchError(
                    f"GET {url} failed with HTTP {response.status}: {_error_text(body)}{hint}"
                )
    except (aiohttp.ClientError, TimeoutError) as error:
        raise FetchError(
            f"GET {url} failed ({type(error).__name__}: {error}); check --mirror and "
            "that the mirror runs"
        ) from error
    try:
        return load_json_bytes(body, f"response of {url}")
    except ValueError as error:
        raise FetchError(str(error)) from error


async def _read_limited(
    response: aiohttp.ClientResponse, limit: int, url: str
) -> bytes:
    chunks = []
    received = 0
    async for chunk in response.content.iter_chunked(CHUNK_SIZE):
        received += len(chunk)
        if received > limit:
            raise FetchError(
                f"response of {url} is larger than {limit} bytes; the mirror is misbehaving"
            )
        chunks.append(chunk)
    return b"".join(chunks)


def _reject_redirect(response: aiohttp.ClientResponse, url: str) -> None:
    """Refuse redirects: a node talks to the mirror it was given, and to no other host."""
    if 300 <= response.status < 400:
        location = response.headers.get("Location", "")
        raise FetchError(
            f"GET {url} was redirected (HTTP {response.status}) to {location!r}; relman "
            "does not follow redirects, so pass that mirror as --mirror if you trust it"
        )


def _status_hint(status: int, body: bytes) -> str:
    """Suggest a fix when a 404 does not come from relman's API (a wrong base URL)."""
    if status == 404 and not body.lstrip().startswith(b"{"):
        return "; check that --mirror is the mirror's base URL, such as http://127.0.0.1:8080"
    return ""


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

    async def fetch(self, digest: str, size: int, label: str = "") -> None:
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
            except FetchError as error:
                raise FetchError(f"cannot fetch {label or digest}: {error}") from error
            except (TimeoutError, aiohttp.ClientError, ConnectionError) as error:
                if attempt == self.retries:
                    raise FetchError(
                        f"download of {label or digest} from {url} failed after "
                        f"{attempt} attempts ({type(error).__name__}: {error}); "
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
        try:
            await asyncio.to_thread(self._commit, partial, digest, size)
        except IntegrityError:
            if not partial.resumed:
                raise
            # The bytes kept from an earlier attempt may have come from another
            # mirror, so one mismatch after a resume earns a full download.
            logger.warning(
                "resumed download of %s failed its hash; fetching it whole", url
            )
            partial.discard()
            await self._attempt(url, partial, digest, size)
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
        if offset and not partial.etag:
            # Without a validator the mirror cannot tell whether the bytes on
            # disk are still a prefix of its blob, so start over.
            partial.discard()
            offset = 0
        headers = {}
        if offset:
            headers["Range"] = f"bytes={offset}-"
            headers["If-Range"] = partial.etag
        async with self.session.get(
            url, headers=headers, allow_redirects=False
        ) as response:
            _reject_redirect(response, url)
            start = self._start_offset(response, url, offset, size, partial)
            partial.begin(offset if start is None else start)
            if start is None:
                return
            offset = start
            partial.remember_etag(response.headers.get("ETag"))
            if offset:
                self.stats.resumed += 1
                partial.resumed = True
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
        window = _SpeedWindow(url)
        with open(partial.path, mode) as stream:
            written = offset
            async for chunk in response.content.iter_chunked(CHUNK_SIZE):
                window.add(len(chunk))
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
        if written < size and response.content_length == written - offset:
            # The response ended at its Content-Length, so the mirror's blob
            # itself is short, and another request would not help.
            partial.discard()
            raise IntegrityError(
                f"mirror sent {written} of the declared {size} bytes for {url} as a "
                "complete response; the blob on the mirror is corrupt"
            )
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
        if partial.size != size:
            received = partial.size
            partial.discard()
            raise IntegrityError(
                f"blob {digest} from the mirror has {received} bytes, the manifest "
                f"declares {size}; the mirror's copy is corrupt or was altered"
            )
        if actual != digest:
            partial.discard()
            raise IntegrityError(
                f"blob from the mirror does not match the manifest: expected sha256 "
                f"{digest}, got {actual}; the mirror's copy is corrupt or was altered"
            )
        partial.etag_path.unlink(missing_ok=True)
        self.store.commit(partial.path, self.store.path(digest))


class _SpeedWindow:
    """Raises when fewer than MIN_BYTES_PER_WINDOW bytes arrive in WINDOW_SECONDS."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.started = time.monotonic()
        self.received = 0

    def add(self, count: int) -> None:
        self.received += count
        elapsed = time.monotonic() - self.started
        if elapsed < WINDOW_SECONDS:
            return
        if self.received < MIN_BYTES_PER_WINDOW:
            raise aiohttp.ClientPayloadError(
                f"{self.url} sent {self.received} bytes in {elapsed:.0f} s, below "
                f"{MIN_BYTES_PER_WINDOW} bytes per {WINDOW_SECONDS:.0f} s"
            )
        self.started = time.monotonic()
        self.received = 0
