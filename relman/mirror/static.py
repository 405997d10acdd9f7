"""Repository files over HTTP: an allowlist of paths, strong ETags, single byte ranges.

Only the public files of a repository are served:

    /config.json, /index.json, /index.json.sig, /crls/<name>.crl
    /manifests/<version>/manifest.json, manifest.json.sig, manifest.json.tsr
    /objects/sha256/<2 hex>/<62 hex>

Every other path, including ``index.sqlite``, ``tmp/`` and ``.lock``, is 404.
Each request first works out its outcome (200, 206, 304 or 416) from the
conditional and Range headers, then sends it. File access runs in worker
threads, and bodies are streamed in chunks of ``CHUNK_SIZE`` bytes.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from aiohttp import web
from multidict import CIMultiDictProxy

from relman.cas.errors import InputError
from relman.cas.versions import validate_version

logger = logging.getLogger(__name__)

CHUNK_SIZE = 256 * 1024
IMMUTABLE = "public, max-age=31536000, immutable"
REVALIDATE = "no-cache"

_CATALOG_FILES = frozenset({"config.json", "index.json", "index.json.sig"})
_RELEASE_FILES = frozenset({"manifest.json", "manifest.json.sig", "manifest.json.tsr"})
_BLOB_PATH = re.compile(r"objects/sha256/([0-9a-f]{2})/([0-9a-f]{62})")
_RELEASE_PATH = re.compile(r"manifests/([^/]+)/([^/]+)")
# Certificate revocation lists that nodes fetch through the mirror.
_CRL_PATH = re.compile(r"crls/[A-Za-z0-9][A-Za-z0-9._-]{0,127}\.crl")
_RANGE_SPEC = re.compile(r"([0-9]+)-([0-9]*)|-([0-9]+)")
_OPAQUE_TAG = re.compile(r'(?:W/)?("[^"]*")')

# Any byte position with more digits than this lies beyond every file, so it
# is read as POSITION_BEYOND_END. This also keeps int() below Python's limit
# on the length of digit strings.
_MAX_POSITION_DIGITS = 20
_POSITION_BEYOND_END = 10**_MAX_POSITION_DIGITS

# Errors from opening a path that is missing or crosses a symlink loop: 404.
_MISSING_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ELOOP})


@dataclass(frozen=True)
class ServedPath:
    """A repository file that may be served.

    Attributes:
        relative: path below the repository root, with "/" separators.
        digest: the SHA-256 in a blob's name, or None for other files.
        cache_control: the Cache-Control value for this file.
    """

    relative: str
    digest: str | None
    cache_control: str


@dataclass(frozen=True)
class OpenedFile:
    """A served file opened for reading, with the size and ETag of its content."""

    descriptor: int
    size: int
    etag: str


class ByteRange(NamedTuple):
    """One range-spec of a Range header (RFC 9110 section 14.1.1).

    Either ``first`` is set (``first-`` or ``first-last``) or
    ``suffix_length`` is (``-suffix_length``).
    """

    first: int | None
    last: int | None
    suffix_length: int | None


@dataclass(frozen=True)
class Outcome:
    """The response to send: its status and, for 200 and 206, the bytes to send."""

    status: int
    first: int = 0
    length: int = 0
    content_range: str | None = None


def classify_path(relative: str) -> ServedPath | None:
    """Map a path below the repository root to a ServedPath, or None if not served."""
    if relative in _CATALOG_FILES or _CRL_PATH.fullmatch(relative):
        return ServedPath(relative, None, REVALIDATE)

    blob = _BLOB_PATH.fullmatch(relative)
    if blob is not None:
        return ServedPath(relative, blob[1] + blob[2], IMMUTABLE)

    release = _RELEASE_PATH.fullmatch(relative)
    is_release_file = release is not None and release[2] in _RELEASE_FILES
    if is_release_file and _is_version(release[1]):
        return ServedPath(relative, None, IMMUTABLE)
    return None


def _is_version(text: str) -> bool:
    try:
        validate_version(text)
    except InputError:
        return False
    return True


def open_served_file(root: str, served: ServedPath) -> OpenedFile | None:
    """Open a served file and compute its ETag, or return None when it is not servable.

    Blocking, so call it from a worker thread. A path that is missing, not a
    regular file, or resolves through symlinks to anything but a served path
    inside the repository returns None.

    Args:
        root: the repository root as returned by os.path.realpath.
        served: the file requested.

    Raises:
        OSError: the file exists but cannot be read (for example EACCES).
    """
    real = _resolve_inside(root, served.relative)
    if real is None:
        return None

    opened = _open_regular_file(real)
    if opened is None:
        return None

    descriptor, size = opened
    try:
        digest = served.digest or _hash_descriptor(descriptor)
    except BaseException:
        os.close(descriptor)
        raise
    return OpenedFile(descriptor, size, f'"{digest}"')


def _resolve_inside(root: str, relative: str) -> str | None:
    # A symlink is followed only when its final target is itself a served path
    # inside the root. So no link can expose index.sqlite, tmp/ or a file
    # outside the repository.
    # NOTE: a folder swapped for a symlink between this check and the open
    # below is not detected. Only the publisher writes to the repository.
    real = os.path.realpath(os.path.join(root, relative))
    if os.path.commonpath([root, real]) != root:
        return None
    if classify_path(os.path.relpath(real, root)) is None:
        return None
    return real


def _open_regular_file(path: str) -> tuple[int, int] | None:
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        descriptor = os.open(path, flags)
    except OSError as error:
        if error.errno in _MISSING_ERRNOS:
            return None
        raise

    status = os.fstat(descriptor)
    if not stat.S_ISREG(status.st_mode):
        os.close(descriptor)
        return None
    return descriptor, status.st_size


def _hash_descriptor(descriptor: int) -> str:
    digest = hashlib.sha256()
    offset = 0
    while chunk := os.pread(descriptor, CHUNK_SIZE, offset):
        digest.update(chunk)
        offset += len(chunk)
    return digest.hexdigest()


def decide_outcome(
    method: str, headers: CIMultiDictProxy[str], etag: str, size: int
) -> Outcome:
    """Work out the status and byte span of a response from the request headers.

    Args:
        method: the request method, GET or HEAD.
        headers: the request headers.
        etag: the current strong ETag of the file, with its quotes.
        size: the file size in bytes.
    """
    # RFC 9110 section 13.2.2: If-None-Match is evaluated before If-Range and
    # Range. Section 13.1.2: when it matches, a GET or HEAD gets 304.
    if _none_match_matches(headers.getall("If-None-Match", []), etag):
        return Outcome(304)

    requested = _honoured_range(method, headers, etag)
    if requested is None:
        return Outcome(200, 0, size)

    span = _satisfiable_span(requested, size)
    if span is None:
        # RFC 9110 section 15.5.17: a 416 names the current length as
        # Content-Range "bytes */<size>".
        return Outcome(416, content_range=f"bytes */{size}")

    # RFC 9110 section 14.4: Content-Range "bytes <first>-<last>/<size>".
    first, last = span
    return Outcome(206, first, last - first + 1, f"bytes {first}-{last}/{size}")


def _none_match_matches(fields: list[str], etag: str) -> bool:
    # RFC 9110 section 13.1.2: "*" matches any current representation, and
    # the entity tags are compared weakly, so a W/ prefix is ignored.
    for field in fields:
        if field.strip() == "*":
            return True
        if etag in _OPAQUE_TAG.findall(field):
            return True
    return False


def _honoured_range(
    method: str, headers: CIMultiDictProxy[str], etag: str
) -> ByteRange | None:
    # RFC 9110 section 14.2: range handling is defined for GET only, and a
    # server must ignore Range on other methods, so HEAD gets a 200.
    if method != "GET":
        return None

    # Several Range fields make the request malformed, so it is ignored.
    ranges = headers.getall("Range", [])
    if len(ranges) != 1:
        return None

    # RFC 9110 section 13.1.5: with If-Range, the Range applies only when the
    # validator is a strong match for the current ETag. A weak tag or a date
    # never matches, because this server sends no Last-Modified.
    if_range = headers.getall("If-Range", [])
    if if_range and [value.strip() for value in if_range] != [etag]:
        return None
    return parse_range(ranges[0])


def parse_range(value: str) -> ByteRange | None:
    """Parse a Range field that contains one byte range.

    Returns None for a malformed field, another range unit, or several
    ranges. The caller then ignores the Range and sends the whole file.
    """
    # RFC 9110 section 14.1: range units compare case-insensitively.
    unit, separator, range_set = value.partition("=")
    if not separator or unit.lower() != "bytes":
        return None

    # RFC 9110 section 5.6.1.2: empty list elements are ignored, so "0-9,"
    # is a single range.
    specs = [spec.strip(" \t") for spec in range_set.split(",")]
    specs = [spec for spec in specs if spec]
    if len(specs) != 1:
        return None

    match = _RANGE_SPEC.fullmatch(specs[0])
    if match is None:
        return None
    if match[3] is not None:
        return ByteRange(None, None, _parse_position(match[3]))

    first = _parse_position(match[1])
    last = _parse_position(match[2]) if match[2] else None
    # RFC 9110 section 14.1.1: a last-pos below first-pos makes the
    # range-spec invalid.
    if last is not None and last < first:
        return None
    return ByteRange(first, last, None)


def _parse_position(digits: str) -> int:
    significant = digits.lstrip("0") or "0"
    if len(significant) > _MAX_POSITION_DIGITS:
        return _POSITION_BEYOND_END
    return int(significant)


def _satisfiable_span(requested: ByteRange, size: int) -> tuple[int, int] | None:
    # RFC 9110 section 15.5.17: no range overlaps an empty file.
    if size == 0:
        return None

    # RFC 9110 section 14.1.1: a suffix-range is satisfiable when its length
    # is above zero, and a suffix longer than the file selects all of it.
    if requested.suffix_length is not None:
        if requested.suffix_length == 0:
            return None
        return max(size - requested.suffix_length, 0), size - 1

    # RFC 9110 section 14.1.1: an int-range is satisfiable when first-pos is
    # below the size, and a last-pos beyond the end is read as size - 1.
    assert requested.first is not None
    if requested.first >= size:
        return None
    last = size - 1 if requested.last is None else min(requested.last, size - 1)
    return requested.first, last


def add_routes(app: web.Application, root: str | Path) -> None:
    """Route GET and HEAD on every path to the repository files.

    The route matches all paths, so add it after every other route.
    """
    files = StaticFiles(root)
    app.router.add_get("/{path:.*}", files.handle)


class StaticFiles:
    """The request handler for the repository's public files."""

    def __init__(self, root: str | Path) -> None:
        self.root = os.path.realpath(root)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Serve one repository file for GET or HEAD, or raise HTTPNotFound."""
        served = classify_path(request.path.removeprefix("/"))
        if served is None:
            raise web.HTTPNotFound()

        loop = asyncio.get_running_loop()
        opened = await loop.run_in_executor(None, open_served_file, self.root, served)
        if opened is None:
            raise web.HTTPNotFound()

        try:
            outcome = decide_outcome(
                request.method, request.headers, opened.etag, opened.size
            )
            return await _send(request, served, opened, outcome)
        finally:
            # Closing a read-only descriptor does not wait for I/O, so it runs
            # here. Awaiting it could be cancelled and leak the descriptor.
            os.close(opened.descriptor)


async def _send(
    request: web.Request, served: ServedPath, opened: OpenedFile, outcome: Outcome
) -> web.StreamResponse:
    response = web.StreamResponse(status=outcome.status)
    response.headers.update(_response_headers(served, opened, outcome))
    if outcome.status in (200, 206, 416):
        response.content_length = outcome.length
    await response.prepare(request)

    try:
        if request.method == "GET" and outcome.length > 0:
            await _stream_body(request, response, opened.descriptor, outcome)
        await response.write_eof()
    except ConnectionResetError as error:
        logger.info("client closed the connection during %s: %s", request.path, error)
    return response


def _response_headers(
    served: ServedPath, opened: OpenedFile, outcome: Outcome
) -> dict[str, str]:
    headers = {
        "ETag": opened.etag,
        "Cache-Control": served.cache_control,
        "Accept-Ranges": "bytes",
    }
    if outcome.status in (200, 206):
        headers["Content-Type"] = _content_type(served.relative)
    if outcome.content_range is not None:
        headers["Content-Range"] = outcome.content_range
    return headers


def _content_type(relative: str) -> str:
    if relative.endswith(".json"):
        return "application/json"
    return "application/octet-stream"


async def _stream_body(
    request: web.Request,
    response: web.StreamResponse,
    descriptor: int,
    outcome: Outcome,
) -> None:
    loop = asyncio.get_running_loop()
    offset = outcome.first
    end = outcome.first + outcome.length
    while offset < end:
        size = min(CHUNK_SIZE, end - offset)
        chunk = await loop.run_in_executor(None, os.pread, descriptor, size, offset)
        if not chunk:
            raise OSError(
                errno.EIO,
                f"{request.path} shrank while being sent: no data at byte "
                f"{offset}, expected {end} bytes",
            )
        await response.write(chunk)
        offset += len(chunk)
