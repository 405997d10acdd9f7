"""Signature verification under a trust policy, with a result cache and an audit trail.

``verify_signature`` runs the whole checklist over signed bytes:

1-4. the CMS structure, digest, signed attributes and signature value
     (relman.cas.cms);
5. the pinned signers, when the policy names any;
6. the timestamp, when one is present, over the signature value, whose time
   becomes the moment of the chain check; a policy may require one;
7. revocation data: CRLs from files and URLs, OCSP when asked for;
8. the signer's chain to a trusted root at that moment, with the codeSigning
   usage (relman.cas.chain).

Every result, success or failure, is passed to the ``audit`` callback with
the signer's fingerprint and the reason. Results are cached by the hash of
the signed bytes, the hash of signature and timestamp, and a hash of policy
and CRLs. With OCSP on, the cache is not used, because a responder's status
may change at any time.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography import x509

from relman.cas.chain import CODE_SIGNING, ValidatedChain, subject_of, validate_chain
from relman.cas.cms import ParsedSignature, check_content, parse_signature
from relman.cas.errors import SignatureError
from relman.cas.policy import TrustPolicy, certificate_fingerprint
from relman.cas.revocation import RevocationInfo, gather_crls
from relman.cas.timestamp import (
    VerifiedTimestamp,
    check_imprint,
    embedded_tokens,
    load_timestamp,
    verify_timestamp,
)

logger = logging.getLogger(__name__)

AuditCallback = Callable[[dict[str, Any]], None]
RETRY_FAILURES_AFTER = timedelta(hours=1)
VERIFIER_VERSION = 2


@dataclass(frozen=True)
class Verification:
    """A signature that passed every check of the policy."""

    signer: x509.Certificate
    subject: str
    fingerprint: str
    timestamp: VerifiedTimestamp | None = None
    notes: tuple[str, ...] = ()
    cached: bool = False

    @property
    def certificate_pem(self) -> str:
        from cryptography.hazmat.primitives import serialization

        return self.signer.public_bytes(serialization.Encoding.PEM).decode("ascii")


class SignatureCache:
    """Verification results kept in a repository index's ``signature_cache`` table."""

    def __init__(self, index) -> None:  # noqa: ANN001 - a RepositoryIndex
        self.index = index

    def get(self, key: tuple[str, str, str]) -> dict[str, Any] | None:
        return self.index.cached_verification(*key)

    def put(
        self,
        key: tuple[str, str, str],
        verified: bool,
        subject: str,
        fingerprint: str,
        reason: str,
        valid_until: datetime | None,
    ) -> None:
        until = valid_until.strftime("%Y-%m-%dT%H:%M:%SZ") if valid_until else None
        self.index.cache_verification(
            *key, verified, subject, fingerprint, reason, until
        )


@dataclass
class _Attempt:
    """Facts one verification has found so far, for the audit record."""

    what: str
    content_hash: str
    signer: x509.Certificate | None = None
    timestamp: VerifiedTimestamp | None = None
    notes: list[str] = field(default_factory=list)


def verify_signature(
    data: bytes,
    signature: bytes,
    policy: TrustPolicy,
    timestamp: bytes | None = None,
    cache: SignatureCache | None = None,
    audit: AuditCallback | None = None,
    what: str = "manifest",
) -> Verification:
    """Verify a detached CMS signature over ``data`` under ``policy``.

    Args:
        data: the signed bytes.
        signature: the DER or BER CMS SignedData.
        policy: roots, revocation, timestamp and pinning settings.
        timestamp: a TimeStampResp or TimeStampToken over the signature value
            (``manifest.json.tsr``); a token inside the signature counts too.
        cache: where results are remembered, or None.
        audit: called once with the outcome, success or failure.
        what: the name of the signed object in messages, such as "manifest".

    Raises:
        SignatureError: a check failed; the message names it.
    """
    attempt = _Attempt(what, hashlib.sha256(data).hexdigest())
    try:
        result = _verify(data, signature, policy, timestamp, cache, attempt)
    except SignatureError as error:
        _record(audit, attempt, "rejected", str(error))
        raise
    except (ValueError, TypeError, OverflowError, KeyError, IndexError) as error:
        # Parsers of hostile input raise these for values they cannot handle;
        # any of them means the signature is rejected, never accepted.
        message = f"malformed signature or timestamp: {type(error).__name__}: {error}"
        _record(audit, attempt, "rejected", message)
        raise SignatureError(message) from error
    _record(
        audit,
        attempt,
        "verified",
        "cached result" if result.cached else "all checks passed",
    )
    return result


def check_signature_only(
    data: bytes, signature: bytes, audit: AuditCallback | None = None
) -> Verification:
    """Run steps 1 to 4 only: the signature is intact, its signer is not authenticated.

    For publishing without a trust policy; a node always verifies the chain.
    """
    attempt = _Attempt("manifest", hashlib.sha256(data).hexdigest())
    attempt.notes.append("certificate chain not checked: no trust policy given")
    try:
        parsed = parse_signature(signature)
        attempt.signer = parsed.signer
        check_content(parsed, data, attempt.what)
    except SignatureError as error:
        _record(audit, attempt, "rejected", str(error))
        raise
    _record(audit, attempt, "verified", "signature intact, chain not checked")
    signer = parsed.signer
    return Verification(
        signer,
        subject_of(signer),
        certificate_fingerprint(signer),
        None,
        tuple(attempt.notes),
    )


def _verify(
    data: bytes,
    signature: bytes,
    policy: TrustPolicy,
    timestamp: bytes | None,
    cache: SignatureCache | None,
    attempt: _Attempt,
) -> Verification:
    # 1-4. CMS structure, digest, signed attributes, signature value.
    parsed = parse_signature(signature)
    attempt.signer = parsed.signer
    check_content(parsed, data, attempt.what)
    subject = subject_of(parsed.signer)
    fingerprint = certificate_fingerprint(parsed.signer)

    # 5. Pinned signers.
    check_pins(parsed.signer, policy)

    # 7. Revocation data, for the timestamp authority and for the signer.
    revocation = gather_crls(policy) if policy.checks_revocation else None

    # 6. Timestamp: its time is the moment of the chain check.
    attempt.timestamp = _verify_timestamps(
        parsed, policy, timestamp, attempt.notes, revocation
    )
    moment = attempt.timestamp.time if attempt.timestamp else datetime.now(UTC)

    # The cache key covers the CRLs, so a new CRL is always checked.
    key = _cache_key(attempt.content_hash, signature, timestamp, policy, revocation)
    use_cache = cache is not None and not policy.ocsp
    if use_cache:
        hit = cache.get(key)
        if hit is not None:
            if not hit["verified"]:
                raise SignatureError(hit["reason"])
            return Verification(
                parsed.signer, subject, fingerprint, attempt.timestamp, (), cached=True
            )

    # 8. The chain, at the moment chosen in step 6.
    try:
        chain = validate_signer(parsed, policy, moment, revocation)
    except SignatureError as error:
        if use_cache:
            # A failure may pass later (a certificate not yet valid, a CRL not
            # yet reachable), so it is kept for an hour at most.
            retry_at = datetime.now(UTC) + RETRY_FAILURES_AFTER
            cache.put(key, False, subject, fingerprint, str(error), retry_at)
        raise
    attempt.notes.extend(chain.revocation_notes)
    if use_cache:
        cache.put(
            key,
            True,
            subject,
            fingerprint,
            "",
            _valid_until(chain, attempt, revocation),
        )
    return Verification(
        parsed.signer, subject, fingerprint, attempt.timestamp, tuple(attempt.notes)
    )


def _valid_until(
    chain, attempt: _Attempt, revocation: RevocationInfo | None
) -> datetime | None:  # noqa: ANN001
    """Return when a cached success must be checked again.

    Without a timestamp the chain was checked at the current time, so the
    result holds only until the first certificate of the path expires. With
    revocation data, it holds only until the first CRL used expires.
    """
    limits = []
    if attempt.timestamp is None:
        limits.extend(cert.not_valid_after_utc for cert in chain.certificates)
    if revocation is not None:
        limits.extend(
            crl.next_update_utc for crl in revocation.crls if crl.next_update_utc
        )
    return min(limits) if limits else None


def validate_signer(
    parsed: ParsedSignature,
    policy: TrustPolicy,
    moment: datetime | None,
    revocation: RevocationInfo | None,
) -> ValidatedChain:
    """Validate a signer's chain as a code signer under ``policy`` at ``moment``."""
    return validate_chain(
        parsed.signer,
        parsed.carried_certificates,
        policy.roots,
        CODE_SIGNING,
        moment,
        policy,
        revocation,
    )


def check_pins(signer: x509.Certificate, policy: TrustPolicy) -> None:
    """Raise SignatureError if the policy pins signers and ``signer`` is not one of them."""
    if not (policy.pinned_fingerprints or policy.pinned_subjects):
        return
    subject = subject_of(signer)
    if (
        certificate_fingerprint(signer) in policy.pinned_fingerprints
        or subject in policy.pinned_subjects
    ):
        return
    raise SignatureError(
        f"signer {subject} (sha256 fingerprint {certificate_fingerprint(signer)}) is not one of "
        "the pinned signers of the trust policy"
    )


def _verify_timestamps(
    parsed: ParsedSignature,
    policy: TrustPolicy,
    timestamp: bytes | None,
    notes: list[str],
    revocation: RevocationInfo | None,
) -> VerifiedTimestamp | None:
    candidates = ([timestamp] if timestamp else []) + embedded_tokens(
        parsed.signer_info
    )
    if not candidates:
        if policy.require_timestamp:
            raise SignatureError(
                "the trust policy requires a timestamp, and the signature has none"
            )
        return None
    if not policy.tsa_roots:
        # Without TSA roots the token cannot be trusted, but a token that does
        # not even cover this signature (a stale .tsr) is still an error.
        check_imprint(load_timestamp(candidates[0]), parsed.signature_value)
        notes.append(
            "timestamp ignored: no tsa_roots are configured, so its time is not trusted"
        )
        logger.warning("%s", notes[-1])
        return None
    return verify_timestamp(candidates[0], parsed.signature_value, policy, revocation)


def _cache_key(
    content_hash: str,
    signature: bytes,
    timestamp: bytes | None,
    policy: TrustPolicy,
    revocation,
) -> tuple[str, str, str]:  # noqa: ANN001
    signature_hash = hashlib.sha256(
        signature + b"\x00" + (timestamp or b"")
    ).hexdigest()
    crl_digest = revocation.crl_digest() if revocation else ""
    # The verifier version is part of the key, so results cached by an older
    # relman are checked again after an upgrade.
    material = f"{VERIFIER_VERSION}:{policy.digest()}:{crl_digest}"
    policy_hash = hashlib.sha256(material.encode()).hexdigest()
    return content_hash, signature_hash, policy_hash


def _record(
    audit: AuditCallback | None, attempt: _Attempt, outcome: str, reason: str
) -> None:
    signer = attempt.signer
    record = {
        "at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "object": attempt.what,
        "content_sha256": attempt.content_hash,
        "outcome": outcome,
        "reason": reason,
        "signer": subject_of(signer) if signer else None,
        "signer_fingerprint": certificate_fingerprint(signer) if signer else None,
        "timestamp": attempt.timestamp.time.strftime("%Y-%m-%dT%H:%M:%SZ")
        if attempt.timestamp
        else None,
        "notes": list(attempt.notes),
    }
    # INFO for both outcomes: a rejection reaches the user as the command's error.
    logger.info(
        "%s %s %s: %s", attempt.what, attempt.content_hash[:16], outcome, reason
    )
    if audit is not None:
        audit(record)
