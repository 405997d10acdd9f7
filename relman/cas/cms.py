"""Detached CMS (PKCS#7) SignedData over manifest bytes: signing and verifying.

Signing uses cryptography's PKCS7SignatureBuilder, so the output is what
``openssl cms -sign -binary -outform DER`` makes: SHA-256, signed attributes
(contentType, signingTime, messageDigest), signer certificate included.

Verification parses with asn1crypto, which reads the BER that ``openssl cms
-sign`` may write, and checks in this order:

1. the structure: SignedData, detached, exactly one SignerInfo;
2. the digest algorithm: SHA-256, SHA-384 or SHA-512 (SHA-1 and MD5 rejected);
3. the signed attributes: contentType is id-data and messageDigest equals
   the digest of the content;
4. the signature over the DER encoding of the signed attributes, with the
   public key of the signer certificate found in the SignedData;
5. the signer certificate's chain to a trusted root (relman.cas.chain).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from asn1crypto import cms as asn1_cms
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.serialization import pkcs7

from relman.cas.chain import validate_signer_chain
from relman.cas.errors import InputError, SignatureError
from relman.cas.pki import load_certificates, load_private_key

logger = logging.getLogger(__name__)

_HASHES = {
    "sha256": (hashlib.sha256, hashes.SHA256),
    "sha384": (hashlib.sha384, hashes.SHA384),
    "sha512": (hashlib.sha512, hashes.SHA512),
}
_WEAK_HASHES = ("md5", "sha1", "sha224")


@dataclass(frozen=True)
class SignerInfo:
    """The verified signer of a manifest."""

    subject: str
    fingerprint: str
    certificate: x509.Certificate

    @property
    def certificate_pem(self) -> str:
        return self.certificate.public_bytes(serialization.Encoding.PEM).decode("ascii")


def sign_detached(data: bytes, key_path: str | Path, cert_path: str | Path) -> bytes:
    """Return a DER detached CMS SignedData over ``data``.

    ``cert_path`` is a PEM file whose first certificate is the signer's; any
    further certificates (intermediates) are included in the SignedData.
    """
    key = load_private_key(key_path)
    certificates = load_certificates(cert_path)
    signer = certificates[0]
    if signer.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        raise InputError(
            f"private key {str(key_path)!r} does not belong to the first certificate "
            f"in {str(cert_path)!r} ({signer.subject.rfc4514_string()})"
        )
    builder = (
        pkcs7.PKCS7SignatureBuilder()
        .set_data(data)
        .add_signer(signer, key, hashes.SHA256())
    )
    for extra in certificates[1:]:
        builder = builder.add_certificate(extra)
    return builder.sign(
        serialization.Encoding.DER,
        [pkcs7.PKCS7Options.DetachedSignature, pkcs7.PKCS7Options.Binary],
    )


def verify_detached(
    data: bytes,
    signature: bytes,
    trust_roots: list[x509.Certificate] | None,
    moment: datetime | None = None,
) -> SignerInfo:
    """Verify a detached CMS signature over ``data`` and the signer's chain.

    With ``trust_roots`` None, steps 1 to 4 run and the chain is not checked:
    the signature is intact, but its signer is not authenticated.

    Raises:
        SignatureError: any step of the module's checklist fails; the message
            names the step and the value involved.
    """
    # 1. Structure.
    signed_data = _load_signed_data(signature)
    content = signed_data["encap_content_info"]["content"]
    if content.native is not None and content.native != data:
        raise SignatureError(
            "the signature embeds content that differs from the manifest"
        )
    signer_infos = signed_data["signer_infos"]
    if len(signer_infos) != 1:
        raise SignatureError(
            f"expected exactly one signer in the signature, found {len(signer_infos)}"
        )
    signer_info = signer_infos[0]

    # 2. Digest algorithm.
    digest_name = signer_info["digest_algorithm"]["algorithm"].native
    if digest_name in _WEAK_HASHES:
        raise SignatureError(
            f"signature uses the {digest_name.upper()} digest, which is too weak; "
            "re-sign with SHA-256 or stronger"
        )
    if digest_name not in _HASHES:
        raise SignatureError(
            f"unsupported digest algorithm {digest_name!r} in signature"
        )
    hash_function, hash_class = _HASHES[digest_name]

    # 3. Signed attributes.
    signed_attrs = signer_info["signed_attrs"]
    if not signed_attrs.native:
        raise SignatureError(
            "the signature has no signed attributes; sign with signed attributes"
        )
    _check_signed_attributes(signed_attrs, hash_function(data).digest())

    # 4. Signature value.
    certificates = _certificates(signed_data)
    signer = _find_signer(signer_info, certificates)
    _check_signature_value(
        signer, signer_info, _signed_attributes_der(signed_attrs), hash_class
    )

    # 5. Certificate chain.
    if trust_roots is not None:
        intermediates = [cert for cert in certificates if cert != signer]
        validate_signer_chain(signer, intermediates, trust_roots, moment)
    fingerprint = signer.fingerprint(hashes.SHA256()).hex()
    logger.debug(
        "signature by %s (%s) verified", signer.subject.rfc4514_string(), fingerprint
    )
    return SignerInfo(signer.subject.rfc4514_string(), fingerprint, signer)


def _load_signed_data(signature: bytes) -> asn1_cms.SignedData:
    try:
        info = asn1_cms.ContentInfo.load(signature)
        if info["content_type"].native != "signed_data":
            raise SignatureError(
                f"signature is a CMS {info['content_type'].native!r}, expected signed_data"
            )
        signed_data = info["content"]
        # Parsing is lazy: touch every part now so malformed input fails here.
        signed_data.native  # noqa: B018
    except SignatureError:
        raise
    except (ValueError, TypeError, KeyError) as error:
        raise SignatureError(
            f"signature is not a valid CMS SignedData structure: {error}"
        ) from error
    return signed_data


def _check_signed_attributes(
    signed_attrs: asn1_cms.CMSAttributes, digest: bytes
) -> None:
    values: dict[str, list] = {}
    for attribute in signed_attrs:
        values.setdefault(attribute["type"].native, []).extend(
            attribute["values"].native
        )
    if values.get("content_type") != ["data"]:
        raise SignatureError(
            f"signed attribute contentType is {values.get('content_type')!r}, expected ['data']"
        )
    if values.get("message_digest") != [digest]:
        raise SignatureError(
            "signature does not cover this manifest: its messageDigest differs "
            "from the manifest's digest (the manifest changed after signing, or "
            "the signature belongs to another file)"
        )


def _signed_attributes_der(signed_attrs: asn1_cms.CMSAttributes) -> bytes:
    """Return the bytes the signature covers: the attributes as a DER SET OF.

    In SignerInfo they are tagged [0] IMPLICIT; the signature is computed over
    the same content with the universal SET tag (RFC 5652, section 5.4).
    """
    untagged = asn1_cms.CMSAttributes.load(signed_attrs.untag().dump())
    return untagged.dump(force=True)


def _certificates(signed_data: asn1_cms.SignedData) -> list[x509.Certificate]:
    result = []
    for choice in signed_data["certificates"] or []:
        if choice.name != "certificate":
            continue
        result.append(x509.load_der_x509_certificate(choice.chosen.dump()))
    return result


def _find_signer(
    signer_info: asn1_cms.SignerInfo, certificates: list[x509.Certificate]
) -> x509.Certificate:
    sid = signer_info["sid"]
    for certificate in certificates:
        if sid.name == "issuer_and_serial_number":
            issuer = sid.chosen["issuer"].dump()
            serial = sid.chosen["serial_number"].native
            if certificate.serial_number == serial and _name_der(certificate) == issuer:
                return certificate
        elif sid.name == "subject_key_identifier":
            try:
                extension = certificate.extensions.get_extension_for_class(
                    x509.SubjectKeyIdentifier
                )
            except x509.ExtensionNotFound:
                continue
            if extension.value.digest == sid.chosen.native:
                return certificate
    raise SignatureError(
        "the signer certificate is not included in the signature; sign with the "
        "certificate embedded (openssl cms -sign without -nocerts)"
    )


def _name_der(certificate: x509.Certificate) -> bytes:
    return certificate.issuer.public_bytes()


def _check_signature_value(
    signer: x509.Certificate,
    signer_info: asn1_cms.SignerInfo,
    signed_bytes: bytes,
    hash_class: type[hashes.HashAlgorithm],
) -> None:
    public_key = signer.public_key()
    algorithm = signer_info["signature_algorithm"]
    name = algorithm["algorithm"].native
    value = signer_info["signature"].native
    try:
        if isinstance(public_key, rsa.RSAPublicKey):
            if name == "rsassa_pss":
                parameters = algorithm["parameters"]
                pss_hash = _HASHES.get(parameters["hash_algorithm"]["algorithm"].native)
                if pss_hash is None:
                    raise SignatureError("unsupported RSASSA-PSS hash in signature")
                pad = padding.PSS(
                    mgf=padding.MGF1(pss_hash[1]()),
                    salt_length=parameters["salt_length"].native,
                )
                public_key.verify(value, signed_bytes, pad, pss_hash[1]())
            else:
                public_key.verify(value, signed_bytes, padding.PKCS1v15(), hash_class())
        elif isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(value, signed_bytes, ec.ECDSA(hash_class()))
        else:
            raise SignatureError(
                f"unsupported signer key type {type(public_key).__name__}; use RSA or ECDSA"
            )
    except InvalidSignature as error:
        raise SignatureError(
            f"signature value does not verify with the key of {signer.subject.rfc4514_string()}"
        ) from error


def parse_embedded_certificates(signature: bytes) -> list[x509.Certificate]:
    """Return the certificates carried in a CMS SignedData (signer first if found)."""
    signed_data = _load_signed_data(signature)
    certificates = _certificates(signed_data)
    try:
        signer = _find_signer(signed_data["signer_infos"][0], certificates)
    except (SignatureError, IndexError):
        return certificates
    return [signer] + [cert for cert in certificates if cert != signer]
