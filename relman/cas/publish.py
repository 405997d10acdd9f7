"""Publishing: verify a signed manifest, store its blobs, make it visible."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from relman.cas.manifest import manifest_hash, parse_manifest_bytes
from relman.cas.policy import TrustPolicy
from relman.cas.repository import Repository
from relman.cas.verify import (
    AuditCallback,
    SignatureCache,
    Verification,
    check_signature_only,
    verify_signature,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PublishResult:
    """Outcome of a publish."""

    version: str
    manifest_hash: str
    signer: Verification
    created: bool
    bytes_copied: int


def publish_release(
    repository_root: str | Path,
    body: bytes,
    signature: bytes,
    release_dir: str | Path,
    policy: TrustPolicy | None,
    timestamp: bytes | None = None,
    progress: Callable[[int], None] | None = None,
    audit: AuditCallback | None = None,
) -> PublishResult:
    """Verify, copy blobs, then store the manifest; all under the repository lock.

    The repository folder is created only once the signature has verified.
    Publishing a version again with the same manifest changes nothing.

    Raises:
        SignatureError: the signature or its chain does not verify.
        ManifestError: the manifest is malformed or unsafe.
        ConflictError: the version exists with other content.
        IntegrityError: a file no longer matches the manifest.
    """
    manifest = parse_manifest_bytes(body)
    if policy is None:
        signer = check_signature_only(body, signature, audit)
    else:
        signer = _verify_with_cache(
            repository_root, body, signature, policy, timestamp, audit
        )
    repository = Repository.create(repository_root)
    with repository.lock():
        if repository.has_release(manifest.version):
            # Raises ConflictError on different content, before any copying.
            created = repository.store_release(body, signature, timestamp)
            return PublishResult(
                manifest.version, manifest_hash(body), signer, created, 0
            )
        copied = repository.import_blobs(manifest, release_dir, progress)
        created = repository.store_release(body, signature, timestamp)
        repository.write_catalog()
    logger.info(
        "published %s (%d files, %d bytes copied) signed by %s",
        manifest.version,
        len(manifest.files),
        copied,
        signer.subject,
    )
    return PublishResult(manifest.version, manifest_hash(body), signer, created, copied)


def _verify_with_cache(
    repository_root: str | Path,
    body: bytes,
    signature: bytes,
    policy: TrustPolicy,
    timestamp: bytes | None,
    audit: AuditCallback | None,
) -> Verification:
    """Verify under ``policy``, using the repository's signature cache if it exists."""
    repository = Repository(repository_root)
    if not (repository.root / "config.json").is_file():
        return verify_signature(body, signature, policy, timestamp, audit=audit)
    with repository.index() as index:
        return verify_signature(
            body, signature, policy, timestamp, SignatureCache(index), audit
        )
