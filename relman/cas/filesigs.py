"""Per-file signatures: the ``file_signature`` of manifest entries.

A file signature is a detached CMS SignedData (base64 DER) over the file's
bytes. Because the manifest's SHA-256 of each file is checked against the
blob, the signature is checked against that digest and no file is read again.

Who may sign a file: with a trust policy, any signer whose chain the policy
accepts. Without one, only the signer of the manifest itself, because its
chain was checked when the manifest was pulled.
"""

from __future__ import annotations

import base64
import binascii
import logging
from datetime import datetime

from cryptography import x509

from relman.cas.chain import subject_of
from relman.cas.cms import check_content_digest, parse_signature
from relman.cas.errors import SignatureError
from relman.cas.manifest import Manifest, ReleaseFile
from relman.cas.policy import TrustPolicy, certificate_fingerprint
from relman.cas.revocation import gather_crls
from relman.cas.verify import check_pins, validate_signer

logger = logging.getLogger(__name__)


def verify_file_signatures(
    manifest: Manifest,
    manifest_signer: x509.Certificate,
    policy: TrustPolicy | None = None,
    moment: datetime | None = None,
) -> int:
    """Verify every file_signature of ``manifest``; return how many were checked.

    With a policy, a file signer must pass the policy's pins and its chain is
    checked at ``moment``: the manifest's verified timestamp, else now.

    Raises:
        SignatureError: a file signature is malformed, covers other content,
            or is made by a signer that is not accepted; the message names the file.
    """
    accepted: set[str] = (
        {certificate_fingerprint(manifest_signer)} if policy is None else set()
    )
    checked = 0
    for entry in manifest.files:
        if entry.file_signature is None:
            continue
        try:
            _verify_one(entry, accepted, manifest_signer, policy, moment)
        except SignatureError as error:
            raise SignatureError(
                f"file signature of {entry.path!r} is invalid: {error}"
            ) from error
        checked += 1
    if checked:
        logger.info("verified %d file signatures of %s", checked, manifest.version)
    return checked


def _verify_one(
    entry: ReleaseFile,
    accepted: set[str],
    manifest_signer: x509.Certificate,
    policy: TrustPolicy | None,
    moment: datetime | None,
) -> None:
    try:
        signature = base64.b64decode(entry.file_signature or "", validate=True)
    except binascii.Error as error:
        raise SignatureError("it is not valid base64") from error
    parsed = parse_signature(signature)
    if parsed.digest_name != "sha256":
        raise SignatureError(
            f"it uses the {parsed.digest_name} digest; file signatures must use sha256"
        )
    check_content_digest(parsed, bytes.fromhex(entry.sha256_hash), "file")

    fingerprint = certificate_fingerprint(parsed.signer)
    if fingerprint in accepted:
        return
    if policy is None:
        raise SignatureError(
            f"it is signed by {subject_of(parsed.signer)}, not by the manifest's signer "
            f"{subject_of(manifest_signer)}; pass --trust or --trust-policy to accept other signers"
        )
    check_pins(parsed.signer, policy)
    revocation = gather_crls(policy) if policy.checks_revocation else None
    validate_signer(parsed, policy, moment, revocation)
    accepted.add(fingerprint)
