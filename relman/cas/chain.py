"""Certificate path validation (RFC 5280) with revocation, at a chosen time.

pyhanko-certvalidator builds and validates the path: validity periods,
basic constraints, key usage, name chaining, signatures along the path, and
the CRLs and OCSP responses it is given. relman adds the usage each role needs. A code signer needs digitalSignature and
codeSigning, a timestamp authority timeStamping. relman also turns every
refusal into one line that names the check and the certificate.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import UTC, datetime

from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from pyhanko_certvalidator import CertificateValidator, ValidationContext
from pyhanko_certvalidator.errors import (
    DisallowedAlgorithmError,
    ExpiredError,
    InsufficientRevinfoError,
    InvalidCertificateError,
    NotYetValidError,
    PathBuildingError,
    PathValidationError,
    RevokedError,
)
from pyhanko_certvalidator.policy_decl import (
    CertRevTrustPolicy,
    RevocationCheckingPolicy,
    RevocationCheckingRule,
)

from relman.cas.errors import SignatureError
from relman.cas.policy import TrustPolicy
from relman.cas.revocation import OcspStatus, RevocationInfo, query_ocsp

logger = logging.getLogger(__name__)

CODE_SIGNING = "code_signing"
TIME_STAMPING = "time_stamping"

_USAGE_NAMES = {CODE_SIGNING: "codeSigning", TIME_STAMPING: "timeStamping"}
_USAGE_OIDS = {
    CODE_SIGNING: ExtendedKeyUsageOID.CODE_SIGNING,
    TIME_STAMPING: ExtendedKeyUsageOID.TIME_STAMPING,
}


@dataclass(frozen=True)
class ValidatedChain:
    """A path from a certificate to a trusted root, and how revocation was checked."""

    certificates: tuple[x509.Certificate, ...]
    revocation_checked: bool
    revocation_notes: tuple[str, ...]


def subject_of(certificate: x509.Certificate) -> str:
    return certificate.subject.rfc4514_string()


def _to_asn1(certificate: x509.Certificate) -> asn1_x509.Certificate:
    return asn1_x509.Certificate.load(
        certificate.public_bytes(serialization.Encoding.DER)
    )


def _from_asn1(certificate: asn1_x509.Certificate) -> x509.Certificate:
    return x509.load_der_x509_certificate(certificate.dump())


def validate_chain(
    leaf: x509.Certificate,
    carried: list[x509.Certificate],
    roots: tuple[x509.Certificate, ...] | list[x509.Certificate],
    usage: str,
    moment: datetime | None = None,
    policy: TrustPolicy | None = None,
    revocation: RevocationInfo | None = None,
) -> ValidatedChain:
    """Validate ``leaf`` up to one of ``roots`` at ``moment`` (default: now).

    Args:
        leaf: the signer or timestamp authority certificate.
        carried: certificates that came with the signature (possible intermediates).
        roots: the trust anchors.
        usage: CODE_SIGNING or TIME_STAMPING, the extended key usage required.
        moment: the time at which every certificate must be valid.
        policy: supplies configured intermediates and the revocation settings;
            None checks no revocation.
        revocation: CRLs already gathered for ``policy``.

    Raises:
        SignatureError: no path reaches a trusted root, a certificate is
            expired, not yet valid, revoked or lacks the usage, or (with
            hard fail) its revocation status could not be obtained.
    """
    subject = subject_of(leaf)
    if not roots:
        raise SignatureError(
            "no trusted root certificates are configured; pass --trust CA.pem"
        )
    _require_usage(leaf, usage)

    moment = moment or datetime.now(UTC)
    intermediates = list(carried) + list(policy.intermediates if policy else ())
    info = revocation or RevocationInfo()
    skip = RevocationCheckingPolicy(
        RevocationCheckingRule.NO_CHECK, RevocationCheckingRule.NO_CHECK
    )

    # First pass: find and validate the path without revocation. Revocation
    # rules and the OCSP issuer come from this validated path, never from
    # names alone, so a look-alike certificate carried in the signature
    # cannot change which issuers are checked.
    path = _validate(leaf, intermediates, roots, usage, moment, skip, info, subject)

    checks = policy is not None and policy.checks_revocation
    notes: list[str] = []
    if not checks:
        return ValidatedChain(tuple(path), False, ())
    ocsp_status = (
        query_ocsp(info, leaf, path[1], policy)
        if policy.ocsp and len(path) > 1
        else None
    )
    rules = _revocation_rules(path, info, policy, ocsp_status, notes)

    # Second pass: the same validation with the revocation rules.
    _validate(leaf, intermediates, roots, usage, moment, rules, info, subject)
    _check_revocation_dates(path, info, ocsp_status, moment, usage)
    return ValidatedChain(tuple(path), True, tuple(notes))


def _validate(
    leaf: x509.Certificate,
    intermediates: list[x509.Certificate],
    roots: tuple[x509.Certificate, ...] | list[x509.Certificate],
    usage: str,
    moment: datetime,
    rules: RevocationCheckingPolicy,
    info: RevocationInfo,
    subject: str,
) -> list[x509.Certificate]:
    """Run pyhanko-certvalidator once; return the validated path, leaf first."""
    context = ValidationContext(
        trust_roots=[_to_asn1(root) for root in roots],
        other_certs=[_to_asn1(cert) for cert in intermediates],
        moment=moment,
        allow_fetching=False,
        crls=[crl.public_bytes(serialization.Encoding.DER) for crl in info.crls],
        # Revocation data may be newer than the moment of a timestamp; CRLs
        # that expired before now were already left out by gather_crls.
        revinfo_policy=CertRevTrustPolicy(rules, retroactive_revinfo=True),
    )
    validator = CertificateValidator(
        _to_asn1(leaf),
        intermediate_certs=[_to_asn1(cert) for cert in intermediates],
        validation_context=context,
    )
    names_path = _build_path(leaf, intermediates, roots)
    try:
        validated = asyncio.run(
            validator.async_validate_usage(
                key_usage={"digital_signature"}, extended_key_usage={usage}
            )
        )
    except PathBuildingError as error:
        raise SignatureError(
            f"certificate chain of {subject} does not reach a trusted root"
        ) from error
    except RevokedError as error:
        raise SignatureError(_revoked_message(names_path, info, error)) from error
    except InsufficientRevinfoError as error:
        raise SignatureError(
            f"revocation status on the path of {subject} could not be checked: {error}"
        ) from error
    except ExpiredError as error:
        raise SignatureError(
            _validity_message(names_path, moment, expired=True)
        ) from error
    except NotYetValidError as error:
        raise SignatureError(
            _validity_message(names_path, moment, expired=False)
        ) from error
    except DisallowedAlgorithmError as error:
        raise SignatureError(
            f"certificate chain of {subject} uses a disallowed algorithm: {error}"
        ) from error
    except InvalidCertificateError as error:
        raise SignatureError(
            f"certificate {subject} is not acceptable: {error}"
        ) from error
    except PathValidationError as error:
        raise SignatureError(
            f"certificate chain of {subject} is invalid: {error}"
        ) from error
    return [
        _from_asn1(cert)
        for cert in reversed(list(validated.iter_certs(include_root=True)))
    ]


def _check_revocation_dates(
    path: list[x509.Certificate],
    info: RevocationInfo,
    ocsp_status: OcspStatus | None,
    moment: datetime,
    usage: str,
) -> None:
    """Reject a revocation that took effect at or before ``moment``.

    A CRL entry's invalidityDate, when present, is when the key was known to
    be compromised; it counts instead of the later revocation date. A
    timestamp authority whose key was compromised is rejected whatever the
    dates, because such a key can sign tokens with any time in them.
    """
    for certificate, issuer in zip(path, path[1:], strict=False):
        entry = info.revocation_entry(certificate, issuer)
        if entry is None:
            continue
        effective = _invalidity_date(entry) or entry.revocation_date_utc
        compromised = _crl_reason(entry) in ("keyCompromise", "cACompromise")
        if effective <= moment or (usage == TIME_STAMPING and compromised):
            raise SignatureError(
                _format_revoked(
                    certificate, entry.revocation_date_utc, _crl_reason(entry)
                )
            )
    if (
        ocsp_status is not None
        and not ocsp_status.good
        and ocsp_status.revoked_at <= moment
    ):
        raise SignatureError(
            _format_revoked(path[0], ocsp_status.revoked_at, ocsp_status.reason)
        )


def _invalidity_date(entry: x509.RevokedCertificate) -> datetime | None:
    try:
        return entry.extensions.get_extension_for_class(
            x509.InvalidityDate
        ).value.invalidity_date_utc
    except x509.ExtensionNotFound:
        return None


def _require_usage(leaf: x509.Certificate, usage: str) -> None:
    """Raise SignatureError unless ``leaf`` carries the extended key usage of its role."""
    name = _USAGE_NAMES[usage]
    try:
        extension = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    except x509.ExtensionNotFound as error:
        raise SignatureError(
            f"certificate {subject_of(leaf)} is missing the {name} extended key usage"
        ) from error
    if _USAGE_OIDS[usage] not in extension.value:
        raise SignatureError(
            f"certificate {subject_of(leaf)} is missing the {name} extended key usage"
        )
    if usage == TIME_STAMPING and not extension.critical:
        raise SignatureError(
            f"timestamp authority certificate {subject_of(leaf)} must mark its "
            "timeStamping extended key usage critical (RFC 3161, section 2.3)"
        )


def _build_path(
    leaf: x509.Certificate,
    intermediates: list[x509.Certificate],
    roots: tuple[x509.Certificate, ...] | list[x509.Certificate],
) -> list[x509.Certificate]:
    """Return leaf, intermediates and root by name chaining, for messages and rules.

    The validator repeats this with full checks; here a missing link only
    means the path stops early.
    """
    path = [leaf]
    pool = list(intermediates) + list(roots)
    while len(path) < 10:
        current = path[-1]
        if current.issuer == current.subject and current in roots:
            break
        issuer = next(
            (
                cert
                for cert in pool
                if cert.subject == current.issuer and cert not in path
            ),
            None,
        )
        if issuer is None:
            break
        path.append(issuer)
    return path


def _revocation_rules(
    path: list[x509.Certificate],
    info: RevocationInfo,
    policy: TrustPolicy,
    ocsp_status: OcspStatus | None,
    notes: list[str],
) -> RevocationCheckingPolicy:
    """Choose what the validator must check, from what was obtained and the policy.

    A certificate whose issuer's CRL was obtained must pass that CRL. The leaf
    may instead have a verified OCSP response, which ``validate_chain`` applies.
    Where neither was obtained, hard fail rejects here and soft fail notes it.
    """
    subject = subject_of(path[0])
    leaf_crl = len(path) > 1 and info.has_crl_from(path[1])
    if not leaf_crl and ocsp_status is None:
        _unknown(f"revocation status of {subject} could not be obtained", info, policy)
        notes.append(f"revocation status of {subject} unknown (soft fail)")

    authorities = path[1:-1]
    authorities_known = all(
        info.has_crl_from(path[index + 1]) for index in range(1, len(path) - 1)
    )
    if authorities and not authorities_known:
        _unknown(
            "revocation status of an intermediate CA could not be obtained",
            info,
            policy,
        )
        notes.append("revocation status of intermediate CAs unknown (soft fail)")
    for note in notes:
        logger.warning("%s", note)

    required = RevocationCheckingRule.CRL_REQUIRED
    skipped = RevocationCheckingRule.NO_CHECK
    return RevocationCheckingPolicy(
        required if leaf_crl else skipped,
        required if authorities and authorities_known else skipped,
    )


def _unknown(what: str, info: RevocationInfo, policy: TrustPolicy) -> None:
    """Raise SignatureError under hard fail; under soft fail the caller notes it."""
    if policy.hard_fail:
        problems = "; ".join(info.problems) or "no CRL or OCSP response covers it"
        raise SignatureError(
            f'{what} ({problems}); the trust policy requires it (revocation = "hard-fail")'
        )


def _revoked_message(
    path: list[x509.Certificate], info: RevocationInfo, error: Exception
) -> str:
    for certificate, issuer in zip(path, path[1:], strict=False):
        entry = info.revocation_entry(certificate, issuer)
        if entry is not None:
            return _format_revoked(
                certificate, entry.revocation_date_utc, _crl_reason(entry)
            )
    detail = getattr(error, "reason", None)
    date = getattr(error, "revocation_dt", None)
    if date is not None:
        reason = getattr(detail, "human_friendly", None) or str(detail or "unspecified")
        return _format_revoked(path[0], date, reason)
    return f"certificate on the path of {subject_of(path[0])} is revoked: {error}"


def _format_revoked(certificate: x509.Certificate, date: datetime, reason: str) -> str:
    return f"certificate {subject_of(certificate)} was revoked on {date:%Y-%m-%d} with reason {reason}"


def _crl_reason(entry: x509.RevokedCertificate) -> str:
    try:
        reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    except x509.ExtensionNotFound:
        return "unspecified"
    # ReasonFlags values are the RFC 5280 names, such as keyCompromise.
    return reason.value


def _validity_message(
    path: list[x509.Certificate], moment: datetime, expired: bool
) -> str:
    for certificate in path:
        if expired and certificate.not_valid_after_utc < moment:
            return f"certificate {subject_of(certificate)} expired on {certificate.not_valid_after_utc:%Y-%m-%d}"
        if not expired and certificate.not_valid_before_utc > moment:
            return (
                f"certificate {subject_of(certificate)} is not valid before "
                f"{certificate.not_valid_before_utc:%Y-%m-%d}"
            )
    state = "expired" if expired else "not yet valid"
    return f"a certificate on the path of {subject_of(path[0])} is {state} at {moment:%Y-%m-%d %H:%M} UTC"
