"""Certificate path validation for manifest signers (RFC 5280).

pyhanko-certvalidator builds and validates the path: validity periods,
basic constraints, key usage, name chaining and signatures along the path.
relman adds the requirements of a code signer: the digitalSignature key
usage and the codeSigning extended key usage.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime

from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from pyhanko_certvalidator import CertificateValidator, ValidationContext
from pyhanko_certvalidator.errors import (
    ExpiredError,
    InvalidCertificateError,
    NotYetValidError,
    PathBuildingError,
    PathValidationError,
    RevokedError,
)

from relman.cas.errors import SignatureError

logger = logging.getLogger(__name__)


def _to_asn1(certificate: x509.Certificate) -> asn1_x509.Certificate:
    return asn1_x509.Certificate.load(
        certificate.public_bytes(serialization.Encoding.DER)
    )


def validate_signer_chain(
    signer: x509.Certificate,
    intermediates: list[x509.Certificate],
    trust_roots: list[x509.Certificate],
    moment: datetime | None = None,
) -> None:
    """Validate ``signer`` up to one of ``trust_roots`` at ``moment`` (default: now).

    Raises:
        SignatureError: no path reaches a trusted root, or a certificate on the
            path is expired, not yet valid, revoked or lacks a required usage.
    """
    if not trust_roots:
        raise SignatureError(
            "no trusted root certificates are configured; pass --trust CA.pem"
        )
    subject = signer.subject.rfc4514_string()
    context = ValidationContext(
        trust_roots=[_to_asn1(root) for root in trust_roots],
        other_certs=[_to_asn1(cert) for cert in intermediates],
        moment=moment or datetime.now(UTC),
        allow_fetching=False,
        revocation_mode="soft-fail",
    )
    validator = CertificateValidator(
        _to_asn1(signer),
        intermediate_certs=[_to_asn1(cert) for cert in intermediates],
        validation_context=context,
    )
    try:
        asyncio.run(
            validator.async_validate_usage(
                key_usage={"digital_signature"},
                extended_key_usage={"code_signing"},
            )
        )
    except PathBuildingError as error:
        raise SignatureError(
            f"certificate chain of {subject} does not reach a trusted root"
        ) from error
    except ExpiredError as error:
        raise SignatureError(
            f"certificate {subject} expired on {signer.not_valid_after_utc:%Y-%m-%d}"
        ) from error
    except NotYetValidError as error:
        raise SignatureError(
            f"certificate {subject} is not valid before {signer.not_valid_before_utc:%Y-%m-%d}"
        ) from error
    except RevokedError as error:
        raise SignatureError(
            f"certificate on the path of {subject} is revoked: {error}"
        ) from error
    except InvalidCertificateError as error:
        raise SignatureError(
            f"certificate {subject} is not acceptable for code signing: {error}"
        ) from error
    except PathValidationError as error:
        raise SignatureError(
            f"certificate chain of {subject} is invalid: {error}"
        ) from error
