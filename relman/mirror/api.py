"""The JSON update API: the list of published versions and their signed envelopes.

    GET /api/updates/manifests             versions lowest first, and the latest
    GET /api/updates/manifests/latest      envelope of the highest readable version
    GET /api/updates/manifests/{version}   envelope of one version

Every request reads the repository folder, so versions published while the
mirror runs appear without a restart. Files are read in worker threads.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from aiohttp import web

from relman.cas.errors import InputError, ManifestError
from relman.cas.repository import MANIFEST_NAME, Repository

logger = logging.getLogger(__name__)

NO_CACHE = {"Cache-Control": "no-cache"}

_Result = TypeVar("_Result")

# The identity of a manifest file on disk: inode, size, modification time in ns.
_FileIdentity = tuple[int, int, int]


class SummaryCache:
    """Release summaries for the version list, parsed once per manifest file.

    An entry is reused while the manifest file keeps its inode, size and
    modification time, so a release that is removed and published again is
    read anew. The methods do blocking file I/O and are safe to call from
    several threads.
    """

    def __init__(self, repository: Repository) -> None:
        self._repository = repository
        self._entries: dict[str, tuple[_FileIdentity, dict[str, Any] | None]] = {}
        self._lock = threading.Lock()

    def summaries(self, request_path: str) -> list[dict[str, Any]]:
        """Return version, manifest_hash, release_date and is_critical per version.

        The list is ordered lowest version first. A version whose manifest
        cannot be read is logged and left out.
        """
        versions = self._repository.versions()
        found = []
        for version in versions:
            summary = self._summary(version, request_path)
            if summary is not None:
                found.append(summary)

        with self._lock:
            for stale in self._entries.keys() - set(versions):
                del self._entries[stale]
        return found

    def _summary(self, version: str, request_path: str) -> dict[str, Any] | None:
        # Stat before reading, so a manifest replaced in between is read
        # again on the next request.
        path = self._repository.release_folder(version) / MANIFEST_NAME
        try:
            identity = _file_identity(path)
        except FileNotFoundError:
            logger.debug("version %s removed while reading %s", version, request_path)
            return None

        with self._lock:
            cached = self._entries.get(version)
        if cached is not None and cached[0] == identity:
            return cached[1]

        # An unreadable manifest is cached as None too, so its error is
        # logged once per file rather than on every request.
        summary = _read_summary(self._repository, version, request_path)
        with self._lock:
            self._entries[version] = (identity, summary)
        return summary


def _file_identity(path: os.PathLike[str]) -> _FileIdentity:
    status = os.stat(path)
    return status.st_ino, status.st_size, status.st_mtime_ns


def _read_summary(
    repository: Repository, version: str, request_path: str
) -> dict[str, Any] | None:
    try:
        release = repository.load_release(version)
    except KeyError:
        logger.debug("version %s removed while reading %s", version, request_path)
        return None
    except ManifestError as error:
        logger.error(
            "leaving version %s out of %s: its stored manifest is invalid: %s",
            version,
            request_path,
            error,
        )
        return None
    return {
        "version": version,
        "manifest_hash": release.manifest_hash,
        "release_date": release.manifest.release_date,
        "is_critical": release.manifest.is_critical,
    }


class UpdatesApi:
    """Request handlers for the update API of one repository."""

    def __init__(self, repository: Repository) -> None:
        self.repository = repository
        self.cache = SummaryCache(repository)

    async def list_manifests(self, request: web.Request) -> web.Response:
        """Send every published version, lowest first, and the highest as latest."""
        summaries = await _in_thread(self.cache.summaries, request.path)
        latest = summaries[-1]["version"] if summaries else None
        body = {"versions": summaries, "latest": latest}
        return web.json_response(body, headers=NO_CACHE)

    async def latest_manifest(self, request: web.Request) -> web.Response:
        """Send the envelope of the version the list names as latest, else 404.

        That is the highest version whose stored manifest can be read.
        """
        summaries = await _in_thread(self.cache.summaries, request.path)
        if not summaries:
            body = {"error": "no version is published in this repository yet"}
            return web.json_response(body, status=404, headers=NO_CACHE)
        return await self._envelope_response(request, summaries[-1]["version"])

    async def manifest(self, request: web.Request) -> web.Response:
        """Send the envelope of one version: 400 if invalid, 404 if missing."""
        return await self._envelope_response(request, request.match_info["version"])

    async def _envelope_response(
        self, request: web.Request, version: str
    ) -> web.Response:
        try:
            envelope = await _in_thread(self.repository.envelope, version)
        except InputError as error:
            logger.info("rejected %s: %s", request.path, error)
            body = {"error": str(error), "version": version}
            return web.json_response(body, status=400, headers=NO_CACHE)
        except KeyError:
            logger.info("manifest not found for version %s (%s)", version, request.path)
            message = f"manifest not found for version {version}"
            body = {"error": message, "version": version}
            return web.json_response(body, status=404, headers=NO_CACHE)
        except ManifestError as error:
            logger.error("failed to send %s: %s", request.path, error)
            body = {"error": f"stored manifest is invalid: {error}", "version": version}
            return web.json_response(body, status=500, headers=NO_CACHE)
        return web.json_response(envelope, headers=NO_CACHE)


async def _in_thread(function: Callable[..., _Result], *arguments: Any) -> _Result:
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, function, *arguments)


def add_routes(app: web.Application, repository: Repository) -> None:
    """Add the update API routes for ``repository`` to ``app``."""
    api = UpdatesApi(repository)
    app.router.add_get("/api/updates/manifests", api.list_manifests)
    app.router.add_get("/api/updates/manifests/latest", api.latest_manifest)
    app.router.add_get("/api/updates/manifests/{version}", api.manifest)
