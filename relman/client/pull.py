"""Pull a release from a mirror into the node's store.

Order of checks, each before the next step:

1. the envelope's body, canonicalised, hashes to its ``manifest_hash``;
2. the CMS signature over those bytes verifies, with the chain to the trust roots;
3. the manifest parses and every path is safe;
4. only then are blobs fetched, and each is checked against its digest and size.

The manifest becomes visible in the store only after all its blobs are there.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import rfc8785

from relman.cas.canonical import canonical_bytes, sha256_hex
from relman.cas.errors import InputError, IntegrityError, ManifestError, SignatureError
from relman.cas.manifest import (
    ENVELOPE_KEYS,
    Manifest,
    ReleaseFile,
    parse_manifest_bytes,
)
from relman.cas.policy import TrustPolicy
from relman.cas.verify import (
    AuditCallback,
    SignatureCache,
    Verification,
    verify_signature,
)
from relman.client.deploy import check_release_symlinks
from relman.client.fetch import BlobFetcher, DownloadStats, get_json, manifest_path
from relman.client.node import Node

logger = logging.getLogger(__name__)

DEFAULT_CONCURRENCY = 4
DEFAULT_TIMEOUT_SECONDS = 60


@dataclass(frozen=True)
class VerifiedEnvelope:
    """A manifest whose signature has verified, with the bytes it was verified over."""

    manifest: Manifest
    body: bytes
    signature: bytes
    timestamp: bytes | None
    signer: Verification

    @property
    def manifest_hash(self) -> str:
        return sha256_hex(self.body)


@dataclass(frozen=True)
class PullResult:
    """Outcome of a pull: the version and the download counts."""

    version: str
    manifest_hash: str
    release_size: int
    missing_blobs: int
    stats: DownloadStats
    seconds: float


def verify_envelope(
    envelope: object,
    policy: TrustPolicy,
    cache: SignatureCache | None = None,
    audit: AuditCallback | None = None,
) -> VerifiedEnvelope:
    """Rebuild the signed bytes from an API envelope and verify them (steps 1 to 3).

    Raises:
        IntegrityError: the body does not hash to the envelope's manifest_hash.
        SignatureError: the signature is missing, malformed or does not verify.
        ManifestError: the signed manifest is malformed or names an unsafe path.
    """
    if not isinstance(envelope, dict):
        raise ManifestError("the mirror's manifest envelope is not a JSON object")
    body_fields = {
        key: value for key, value in envelope.items() if key not in ENVELOPE_KEYS
    }
    try:
        body = canonical_bytes(body_fields)
    except (
        ValueError,
        TypeError,
        RecursionError,
        rfc8785.CanonicalizationError,
    ) as error:
        raise ManifestError(
            f"the mirror's manifest envelope cannot be canonicalised: {error}"
        ) from error

    # 1. The body matches the hash the envelope announces.
    declared = envelope.get("manifest_hash")
    if sha256_hex(body) != declared:
        raise IntegrityError(
            f"manifest hash mismatch: the envelope declares {declared!r}, the body "
            f"hashes to {sha256_hex(body)}"
        )

    # 2. The signature verifies over exactly those bytes.
    try:
        signature = base64.b64decode(envelope.get("signature") or "", validate=True)
    except (binascii.Error, TypeError) as error:
        raise SignatureError("the envelope's signature is not valid base64") from error
    if not signature:
        raise SignatureError("the envelope carries no signature")
    timestamp = _decode_timestamp(envelope.get("timestamp_token"))
    signer = verify_signature(body, signature, policy, timestamp, cache, audit)

    # 3. The signed manifest is well formed.
    manifest = parse_manifest_bytes(body)
    # The token is not covered by the signature, so it is kept only if it verified.
    verified_timestamp = timestamp if signer.timestamp is not None else None
    return VerifiedEnvelope(manifest, body, signature, verified_timestamp, signer)


def _decode_timestamp(token: object) -> bytes | None:
    if token is None or token == "":
        return None
    try:
        return base64.b64decode(token, validate=True)
    except (binascii.Error, TypeError) as error:
        raise SignatureError(
            "the envelope's timestamp_token is not valid base64"
        ) from error


def _verify_on_node(
    node: Node, envelope: object, policy: TrustPolicy
) -> VerifiedEnvelope:
    """Verify an envelope with the node's signature cache and security audit log."""
    with node.store.index() as index, node.state() as state:
        return verify_envelope(
            envelope, policy, SignatureCache(index), state.security_audit
        )


async def pull_release(
    mirror: str,
    root: str | Path,
    policy: TrustPolicy,
    version: str | None = None,
    concurrency: int = DEFAULT_CONCURRENCY,
    progress_factory: Callable[[int, str], object] | None = None,
) -> PullResult:
    """Fetch the manifest of ``version`` (default: the latest) and the blobs the node lacks."""
    started = time.monotonic()
    check_mirror_url(mirror)
    lock = Node(root).lock()
    # Waiting for another pull, apply or rollback blocks, so it runs in a thread.
    await asyncio.to_thread(lock.__enter__)
    try:
        # Created under the lock, so a second pull never finds a half-made store.
        node = Node.open(root, create=True)
        return await _pull_locked(
            node, mirror, policy, version, concurrency, progress_factory, started
        )
    finally:
        lock.__exit__(None, None, None)


def check_mirror_url(mirror: str) -> None:
    """Raise InputError unless ``mirror`` is an http:// or https:// URL with a host."""
    parts = urlsplit(mirror)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise InputError(
            f"invalid mirror URL {mirror!r}: expected http://HOST:PORT or https://HOST, "
            "such as http://127.0.0.1:8080"
        )


async def _pull_locked(
    node: Node,
    mirror: str,
    policy: TrustPolicy,
    version: str | None,
    concurrency: int,
    progress_factory: Callable[[int, str], object] | None,
    started: float,
) -> PullResult:
    timeout = aiohttp.ClientTimeout(
        total=None,
        sock_connect=DEFAULT_TIMEOUT_SECONDS,
        sock_read=DEFAULT_TIMEOUT_SECONDS,
    )
    # Bytes are hashed as they arrive, so no Content-Encoding may change them,
    # and a compressed body could expand beyond any size limit.
    async with aiohttp.ClientSession(
        timeout=timeout,
        raise_for_status=False,
        auto_decompress=False,
        headers={"Accept-Encoding": "identity"},
    ) as session:
        envelope = await get_json(session, mirror, manifest_path(version))
        try:
            verified = await asyncio.to_thread(_verify_on_node, node, envelope, policy)
        except Exception as error:
            _audit(node, "pull", version, "rejected", mirror=mirror, reason=str(error))
            raise
        if version is not None and verified.manifest.version != version:
            raise ManifestError(
                f"the mirror returned version {verified.manifest.version} when asked for {version}"
            )
        store = node.store
        missing = _missing_blobs(verified.manifest, store.blobs)
        total = sum(entry.size_bytes for entry in missing.values())
        logger.info(
            "pulling %s: %d of %d blobs missing, %d bytes",
            verified.manifest.version,
            len(missing),
            len(verified.manifest.files),
            total,
        )
        bar = (
            progress_factory(total, f"pull {verified.manifest.version}")
            if progress_factory
            else None
        )
        fetcher = BlobFetcher(
            session, mirror, store.blobs, progress=bar.update if bar else None
        )
        try:
            await _fetch_all(
                fetcher, list(missing.values()), verified.manifest.version, concurrency
            )
        finally:
            if bar:
                bar.close()

    try:
        await asyncio.to_thread(
            check_release_symlinks, verified.manifest, node.store.blobs
        )
    except ManifestError as error:
        _audit(
            node,
            "pull",
            verified.manifest.version,
            "rejected",
            mirror=mirror,
            reason=str(error),
        )
        raise
    await asyncio.to_thread(_record, node, verified, mirror)
    logger.info("pulled %s from %s", verified.manifest.version, mirror)
    return PullResult(
        verified.manifest.version,
        verified.manifest_hash,
        verified.manifest.total_size,
        len(missing),
        fetcher.stats,
        time.monotonic() - started,
    )


def _missing_blobs(manifest: Manifest, blobs) -> dict[str, ReleaseFile]:  # noqa: ANN001
    """Return the entries whose blobs the store lacks, one per digest."""
    missing: dict[str, ReleaseFile] = {}
    for entry in manifest.files:
        if entry.sha256_hash not in missing and not blobs.has(entry.sha256_hash):
            missing[entry.sha256_hash] = entry
    return missing


async def _fetch_all(
    fetcher: BlobFetcher, entries: list[ReleaseFile], version: str, concurrency: int
) -> None:
    """Fetch every missing blob, at most ``concurrency`` at once; stop at the first failure."""
    queue: asyncio.Queue[ReleaseFile] = asyncio.Queue()
    for entry in sorted(entries, key=lambda item: -item.size_bytes):
        queue.put_nowait(entry)

    async def worker() -> None:
        while True:
            try:
                entry = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            label = f"{entry.path!r} of version {version}"
            await fetcher.fetch(entry.sha256_hash, entry.size_bytes, label)

    tasks = [asyncio.create_task(worker()) for _ in range(max(1, concurrency))]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _record(node: Node, verified: VerifiedEnvelope, mirror: str) -> None:
    """Store the verified manifest; the caller holds the node's lock."""
    node.store.store_release(verified.body, verified.signature, verified.timestamp)
    with node.state() as state:
        state.record_verified(
            verified.manifest.version,
            verified.manifest_hash,
            verified.signer.subject,
            verified.signer.fingerprint,
            mirror,
        )
        state.audit(
            "pull",
            verified.manifest.version,
            "ok",
            mirror=mirror,
            manifest_hash=verified.manifest_hash,
        )


def _audit(
    node: Node, action: str, version: str | None, outcome: str, **detail: object
) -> None:
    with node.state() as state:
        state.audit(action, version, outcome, **detail)
