"""Detached CMS (PKCS#7) SignedData over manifest bytes: signing and the signature checks.

Signing uses cryptography's PKCS7SignatureBuilder, so the output is what
``openssl cms -sign -binary -outform DER`` makes: signed attributes
(contentType, signingTime, messageDigest), signer certificate included.

``parse_signature`` and ``check_content`` are steps 1 to 4 of verification;
relman.cas.verify adds the timestamp, revocation and chain steps:

1. the structure: SignedData, exactly one SignerInfo, signer certificate included;
2. the digest algorithm: SHA-256, SHA-384 or SHA-512 (SHA-1 and MD5 rejected);
3. the signed attributes: contentType is id-data and messageDigest equals
   the digest of the content;
4. the signature value over the DER encoding of the signed attributes, with
   RSA PKCS#1 v1.5, RSASSA-PSS or ECDSA.

asn1crypto parses the SignedData, so the BER that ``openssl cms -sign`` may
write is read as well as DER.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from asn1crypto import cms as asn1_cms
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.serialization import pkcs7

from relman.cas.errors import InputError, SignatureError
from relman.cas.pki import load_certificates, load_private_key

logger = logging.getLogger(__name__)

_HASHES = {
    "sha256": (hashlib.sha256, hashes.SHA256),
    "sha384": (hashlib.sha384, hashes.SHA384),
    "sha512": (hashlib.sha512, hashes.SHA512),
}
_WEAK_HASHES = ("md5", "sha1", "sha224")
DIGESTS = tuple(_HASHES)


@dataclass(frozen=True)
class ParsedSignature:
    """A SignedData whose structure and digest algorithm passed steps 1 and 2."""

    signed_data: asn1_cms.SignedData
    signer_info: asn1_cms.SignerInfo
    signer: x509.Certificate
    certificates: tuple[x509.Certificate, ...]
    digest_name: str

    @property
    def signature_value(self) -> bytes:
        """The signature octets, which an RFC 3161 timestamp covers."""
        return self.signer_info["signature"].native

    @property
    def carried_certificates(self) -> list[x509.Certificate]:
        return [cert for cert in self.certificates if cert != self.signer]


def sign_detached(
    data: bytes,
    key_path: str | Path,
    cert_path: str | Path,
    digest: str = "sha256",
    rsa_pss: bool = False,
) -> bytes:
    """Return a DER detached CMS SignedData over ``data``.

    ``cert_path`` is a PEM file whose first certificate is the signer's; any
    further certificates (intermediates) are included in the SignedData.

    Raises:
        InputError: the key does not match the certificate, or ``rsa_pss`` is
            set for a key that is not RSA.
    """
    key, certificates = load_signer(key_path, cert_path)
    signer = certificates[0]
    if digest not in _HASHES:
        raise InputError(
            f"invalid digest {digest!r}; choose one of {', '.join(DIGESTS)}"
        )
    hash_algorithm = _HASHES[digest][1]()
    options = {}
    if rsa_pss:
        if not isinstance(key, rsa.RSAPrivateKey):
            raise InputError("--rsa-pss needs an RSA key")
        options["rsa_padding"] = padding.PSS(
            mgf=padding.MGF1(hash_algorithm), salt_length=hash_algorithm.digest_size
        )
    builder = (
        pkcs7.PKCS7SignatureBuilder()
        .set_data(data)
        .add_signer(signer, key, hash_algorithm, **options)
    )
    for extra in certificates[1:]:
        builder = builder.add_certificate(extra)
    return builder.sign(
        serialization.Encoding.DER,
        [pkcs7.PKCS7Options.DetachedSignature, pkcs7.PKCS7Options.Binary],
    )


def _public_der(public_key) -> bytes:  # noqa: ANN001 - any cryptography public key
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_signer(
    key_path: str | Path, cert_path: str | Path
) -> tuple[object, list[x509.Certificate]]:
    """Load a private key and its certificate chain, checking that they belong together.

    Raises:
        InputError: a file cannot be read, or the key is not the first certificate's.
    """
    key = load_private_key(key_path)
    certificates = load_certificates(cert_path)
    if _public_der(certificates[0].public_key()) != _public_der(key.public_key()):
        raise InputError(
            f"private key {str(key_path)!r} does not belong to the first certificate "
            f"in {str(cert_path)!r} ({certificates[0].subject.rfc4514_string()})"
        )
    return key, certificates


def sign_digest(
    digest: bytes, digest_name: str, key, certificates: list[x509.Certificate]
) -> bytes:  # noqa: ANN001
    """Return a DER detached CMS SignedData for content whose digest is already known.

    The content itself is never read, so a file of any size can be signed
    from the SHA-256 the manifest records. The result has the same form as
    ``sign_detached``: contentType, signingTime and messageDigest attributes,
    signer certificate and chain included, RSA PKCS#1 v1.5 or ECDSA.
    """
    hash_class = _HASHES[digest_name][1]
    attributes = asn1_cms.CMSAttributes(
        [
            {"type": "content_type", "values": ["data"]},
            {
                "type": "signing_time",
                "values": [
                    asn1_cms.Time(
                        {"utc_time": datetime.now(UTC).replace(microsecond=0)}
                    )
                ],
            },
            {"type": "message_digest", "values": [digest]},
        ]
    )
    signed_bytes = attributes.dump(force=True)
    if isinstance(key, rsa.RSAPrivateKey):
        value = key.sign(signed_bytes, padding.PKCS1v15(), hash_class())
        algorithm = {"algorithm": "rsassa_pkcs1v15"}
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        value = key.sign(signed_bytes, ec.ECDSA(hash_class()))
        algorithm = {"algorithm": f"{digest_name}_ecdsa"}
    else:
        raise InputError(f"unsupported key type {type(key).__name__}; use RSA or ECDSA")
    asn1_certificates = [
        asn1_x509.Certificate.load(cert.public_bytes(serialization.Encoding.DER))
        for cert in certificates
    ]
    signer_info = asn1_cms.SignerInfo(
        {
            "version": "v1",
            "sid": asn1_cms.SignerIdentifier(
                {
                    "issuer_and_serial_number": {
                        "issuer": asn1_certificates[0].issuer,
                        "serial_number": asn1_certificates[0].serial_number,
                    }
                }
            ),
            "digest_algorithm": {"algorithm": digest_name},
            "signed_attrs": attributes,
            "signature_algorithm": algorithm,
            "signature": value,
        }
    )
    signed_data = asn1_cms.SignedData(
        {
            "version": "v1",
            "digest_algorithms": [{"algorithm": digest_name}],
            "encap_content_info": {"content_type": "data"},
            "certificates": asn1_certificates,
            "signer_infos": [signer_info],
        }
    )
    return asn1_cms.ContentInfo(
        {"content_type": "signed_data", "content": signed_data}
    ).dump()


def parse_signature(signature: bytes) -> ParsedSignature:
    """Run steps 1 and 2: parse the SignedData, check its digest, find the signer.

    Raises:
        SignatureError: the bytes are not a usable SignedData.
    """
    # 1. Structure.
    signed_data = _load_signed_data(signature)
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

    certificates = _certificates(signed_data)
    signer = _find_signer(signer_info, certificates)
    return ParsedSignature(
        signed_data, signer_info, signer, tuple(certificates), digest_name
    )


def check_content(parsed: ParsedSignature, data: bytes, what: str = "content") -> None:
    """Run steps 3 and 4: the signed attributes and the signature value cover ``data``.

    Raises:
        SignatureError: ``data`` is not what was signed, or the value does not verify.
    """
    embedded = parsed.signed_data["encap_content_info"]["content"].native
    if embedded is not None and embedded != data:
        raise SignatureError(
            f"the signature embeds content that differs from the {what}"
        )
    check_content_digest(parsed, _HASHES[parsed.digest_name][0](data).digest(), what)


def check_content_digest(
    parsed: ParsedSignature, digest: bytes, what: str = "content"
) -> None:
    """Run steps 3 and 4 for content whose digest, by ``parsed.digest_name``, is known."""
    hash_class = _HASHES[parsed.digest_name][1]

    # 3. Signed attributes.
    signed_attrs = parsed.signer_info["signed_attrs"]
    if not signed_attrs.native:
        raise SignatureError(
            "the signature has no signed attributes; sign with signed attributes"
        )
    _check_signed_attributes(signed_attrs, digest, what)

    # 4. Signature value.
    _check_signature_value(
        parsed.signer,
        parsed.signer_info,
        _signed_attributes_der(signed_attrs),
        hash_class,
    )


def _load_signed_data(signature: bytes) -> asn1_cms.SignedData:
    if not signature:
        raise SignatureError("the signature file is empty")
    if signature.lstrip().startswith(b"-----BEGIN"):
        signature = _pem_body(signature)
    try:
        # strict: bytes after the structure are an error, not ignored.
        info = asn1_cms.ContentInfo.load(signature, strict=True)
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
    signed_attrs: asn1_cms.CMSAttributes, digest: bytes, what: str
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
            f"signature does not cover this {what}: its messageDigest differs "
            f"from the {what}'s digest (the {what} changed after signing, or "
            "the signature belongs to something else)"
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
            if (
                certificate.serial_number == serial
                and certificate.issuer.public_bytes() == issuer
            ):
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
    subject = signer.subject.rfc4514_string()
    if name in ("md5_rsa", "sha1_rsa", "sha1_ecdsa", "sha224_rsa", "sha224_ecdsa"):
        raise SignatureError(
            f"signature by {subject} uses the weak algorithm {name}; re-sign with SHA-256 or stronger"
        )
    check_key_strength(public_key, subject)
    # An algorithm that names its hash (sha512_ecdsa) signs with that hash;
    # a bare one (ecdsa, rsassa_pkcs1v15) uses the digestAlgorithm's.
    named_hash = _SIGNATURE_HASHES.get(name)
    signing_hash = named_hash() if named_hash else hash_class()
    try:
        if isinstance(public_key, rsa.RSAPublicKey) and name == "rsassa_pss":
            public_key.verify(value, signed_bytes, *_pss_parameters(algorithm))
        elif isinstance(public_key, rsa.RSAPublicKey) and name in _RSA_ALGORITHMS:
            public_key.verify(value, signed_bytes, padding.PKCS1v15(), signing_hash)
        elif (
            isinstance(public_key, ec.EllipticCurvePublicKey)
            and name in _ECDSA_ALGORITHMS
        ):
            public_key.verify(value, signed_bytes, ec.ECDSA(signing_hash))
        else:
            raise SignatureError(
                f"signature algorithm {name!r} does not fit the {type(public_key).__name__} "
                f"key of {subject}; use RSA (PKCS#1 v1.5 or PSS) or ECDSA"
            )
    except InvalidSignature as error:
        raise SignatureError(
            f"signature value does not verify with the key of {subject}"
        ) from error


_RSA_ALGORITHMS = ("rsassa_pkcs1v15", "sha256_rsa", "sha384_rsa", "sha512_rsa")
_ECDSA_ALGORITHMS = ("ecdsa", "sha256_ecdsa", "sha384_ecdsa", "sha512_ecdsa")
_SIGNATURE_HASHES = {
    "sha256_rsa": hashes.SHA256,
    "sha384_rsa": hashes.SHA384,
    "sha512_rsa": hashes.SHA512,
    "sha256_ecdsa": hashes.SHA256,
    "sha384_ecdsa": hashes.SHA384,
    "sha512_ecdsa": hashes.SHA512,
}
MIN_RSA_BITS = 2048
ALLOWED_CURVES = ("secp256r1", "secp384r1", "secp521r1")


def check_key_strength(public_key, subject: str) -> None:  # noqa: ANN001
    """Raise SignatureError for RSA keys under 2048 bits and curves other than P-256/384/521."""
    if isinstance(public_key, rsa.RSAPublicKey) and public_key.key_size < MIN_RSA_BITS:
        raise SignatureError(
            f"the RSA key of {subject} has {public_key.key_size} bits, which is too weak; "
            f"use at least {MIN_RSA_BITS}"
        )
    if (
        isinstance(public_key, ec.EllipticCurvePublicKey)
        and public_key.curve.name not in ALLOWED_CURVES
    ):
        raise SignatureError(
            f"the key of {subject} uses curve {public_key.curve.name}; use P-256, P-384 or P-521"
        )


def _pem_body(data: bytes) -> bytes:
    """Return the DER inside a PEM signature, as ``openssl cms -outform PEM`` writes it."""
    lines = [line.strip() for line in data.decode("ascii", "replace").splitlines()]
    body = "".join(line for line in lines if line and not line.startswith("-----"))
    try:
        return base64.b64decode(body, validate=True)
    except binascii.Error as error:
        raise SignatureError("the PEM signature has an invalid base64 body") from error


def _pss_parameters(algorithm) -> tuple[padding.PSS, hashes.HashAlgorithm]:  # noqa: ANN001
    parameters = algorithm["parameters"]
    hash_name = parameters["hash_algorithm"]["algorithm"].native
    if hash_name in _WEAK_HASHES:
        raise SignatureError(
            f"RSASSA-PSS signature uses the {hash_name.upper()} digest, which is too weak"
        )
    if hash_name not in _HASHES:
        raise SignatureError(f"unsupported RSASSA-PSS hash {hash_name!r} in signature")
    hash_class = _HASHES[hash_name][1]
    mgf_hash = parameters["mask_gen_algorithm"]["parameters"]["algorithm"].native
    if mgf_hash not in _HASHES:
        raise SignatureError(
            f"unsupported RSASSA-PSS MGF1 hash {mgf_hash!r} in signature"
        )
    pad = padding.PSS(
        mgf=padding.MGF1(_HASHES[mgf_hash][1]()),
        salt_length=parameters["salt_length"].native,
    )
    return pad, hash_class()


def parse_embedded_certificates(signature: bytes) -> list[x509.Certificate]:
    """Return the certificates carried in a CMS SignedData, signer first."""
    parsed = parse_signature(signature)
    return [parsed.signer, *parsed.carried_certificates]
