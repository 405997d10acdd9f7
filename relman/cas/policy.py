"""Trust policy: which roots, revocation sources, timestamps and signers to accept.

A policy comes from a TOML file (``--trust-policy FILE``) or from a PEM file
of roots (``--trust CA.pem``), which is the same as a policy with only
``roots``. Relative paths in the TOML file are taken from the file's folder.
docs/security.md describes every key.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from relman.cas.canonical import canonical_bytes
from relman.cas.errors import InputError
from relman.cas.pki import load_certificates

REVOCATION_MODES = ("soft-fail", "hard-fail")
DEFAULT_FETCH_TIMEOUT = 10.0
MAX_FETCH_TIMEOUT = 3600.0
_FINGERPRINT = re.compile(r"[0-9a-f]{64}")

_KEYS = {
    "roots": list,
    "intermediates": list,
    "tsa_roots": list,
    "require_timestamp": bool,
    "crl_files": list,
    "crl_urls": list,
    "ocsp": bool,
    "ocsp_url": str,
    "revocation": str,
    "pinned_fingerprints": list,
    "pinned_subjects": list,
    "fetch_timeout": (int, float),
}


@dataclass(frozen=True)
class TrustPolicy:
    """Everything a verifier needs to decide whether to trust a signature."""

    roots: tuple[x509.Certificate, ...]
    intermediates: tuple[x509.Certificate, ...] = ()
    tsa_roots: tuple[x509.Certificate, ...] = ()
    require_timestamp: bool = False
    crl_files: tuple[Path, ...] = ()
    crl_urls: tuple[str, ...] = ()
    ocsp: bool = False
    ocsp_url: str | None = None
    revocation: str = "soft-fail"
    pinned_fingerprints: frozenset[str] = field(default_factory=frozenset)
    pinned_subjects: frozenset[str] = field(default_factory=frozenset)
    fetch_timeout: float = DEFAULT_FETCH_TIMEOUT
    source: str = ""

    @property
    def checks_revocation(self) -> bool:
        return bool(self.crl_files or self.crl_urls or self.ocsp)

    @property
    def hard_fail(self) -> bool:
        return self.revocation == "hard-fail"

    def digest(self) -> str:
        """Return a SHA-256 over every setting and certificate of the policy.

        CRL contents are not part of it; the signature cache adds them
        separately, so a new CRL invalidates cached results.
        """
        summary = {
            "roots": [_certificate_digest(cert) for cert in self.roots],
            "intermediates": [_certificate_digest(cert) for cert in self.intermediates],
            "tsa_roots": [_certificate_digest(cert) for cert in self.tsa_roots],
            "require_timestamp": self.require_timestamp,
            "crl_files": [str(path) for path in self.crl_files],
            "crl_urls": list(self.crl_urls),
            "ocsp": self.ocsp,
            "ocsp_url": self.ocsp_url,
            "revocation": self.revocation,
            "pinned_fingerprints": sorted(self.pinned_fingerprints),
            "pinned_subjects": sorted(self.pinned_subjects),
        }
        return hashlib.sha256(canonical_bytes(summary)).hexdigest()


def _certificate_digest(certificate: x509.Certificate) -> str:
    return hashlib.sha256(
        certificate.public_bytes(serialization.Encoding.DER)
    ).hexdigest()


def certificate_fingerprint(certificate: x509.Certificate) -> str:
    """Return the SHA-256 fingerprint of a certificate as lowercase hex."""
    return certificate.fingerprint(hashes.SHA256()).hex()


def policy_from_roots(path: str | Path) -> TrustPolicy:
    """Return the policy that ``--trust CA.pem`` stands for: those roots, nothing else."""
    roots = tuple(load_certificates(path))
    _require_authorities(roots, str(path))
    return TrustPolicy(roots=roots, source=str(path))


def _require_authorities(
    certificates: tuple[x509.Certificate, ...], source: str
) -> None:
    """Raise InputError for a trust anchor that is not a CA certificate.

    Trusting an end-entity certificate as a root would accept it for any
    purpose; pinned_fingerprints is the way to accept one signer.
    """
    for certificate in certificates:
        try:
            is_ca = certificate.extensions.get_extension_for_class(
                x509.BasicConstraints
            ).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if not is_ca:
            raise InputError(
                f"{certificate.subject.rfc4514_string()} in {source!r} is not a CA certificate "
                "(basicConstraints cA is not set); trust the CA that issued it, and pin "
                "the signer with pinned_fingerprints in a trust policy if needed"
            )


def load_policy(path: str | Path) -> TrustPolicy:
    """Read a TOML trust policy.

    Raises:
        InputError: the file cannot be read, is not valid TOML, has an unknown
            key or a value of the wrong type, or names a file that is missing.
    """
    policy_path = Path(path)
    try:
        data = tomllib.loads(policy_path.read_text(encoding="utf-8"))
    except OSError as error:
        raise InputError(
            f"cannot read trust policy {str(path)!r}: {error.strerror}"
        ) from error
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise InputError(
            f"trust policy {str(path)!r} is not valid TOML: {error}"
        ) from error
    _check_keys(data, str(path))

    folder = policy_path.parent
    roots = _load_all(folder, data.get("roots", []), "roots", str(path))
    _require_authorities(roots, str(path))
    if not roots:
        raise InputError(
            f'trust policy {str(path)!r} names no roots; add roots = ["ca.pem"]'
        )
    revocation = data.get("revocation", "soft-fail")
    if revocation not in REVOCATION_MODES:
        raise InputError(
            f"trust policy {str(path)!r}: invalid revocation {revocation!r}, "
            f"expected one of {', '.join(REVOCATION_MODES)}"
        )
    crl_files = tuple(folder / name for name in _strings(data, "crl_files", str(path)))
    for crl in crl_files:
        if not crl.is_file():
            raise InputError(
                f"trust policy {str(path)!r}: CRL file {str(crl)!r} does not exist"
            )
    timeout = float(data.get("fetch_timeout", DEFAULT_FETCH_TIMEOUT))
    if not 0 < timeout <= MAX_FETCH_TIMEOUT:
        raise InputError(
            f"trust policy {str(path)!r}: invalid fetch_timeout {timeout!r}, expected "
            f"seconds above 0 and at most {MAX_FETCH_TIMEOUT:.0f}"
        )
    _check_consistency(data, str(path))

    return TrustPolicy(
        roots=roots,
        intermediates=_load_all(
            folder, data.get("intermediates", []), "intermediates", str(path)
        ),
        tsa_roots=_load_all(folder, data.get("tsa_roots", []), "tsa_roots", str(path)),
        require_timestamp=data.get("require_timestamp", False),
        crl_files=crl_files,
        crl_urls=tuple(_strings(data, "crl_urls", str(path))),
        ocsp=data.get("ocsp", False),
        ocsp_url=data.get("ocsp_url") or None,
        revocation=revocation,
        pinned_fingerprints=frozenset(_fingerprints(data, str(path))),
        pinned_subjects=frozenset(_strings(data, "pinned_subjects", str(path))),
        fetch_timeout=timeout,
        source=str(path),
    )


def resolve_policy(trust: str | None, trust_policy: str | None) -> TrustPolicy | None:
    """Return the policy the ``--trust`` or ``--trust-policy`` option names, if any."""
    if trust and trust_policy:
        raise InputError("pass either --trust or --trust-policy, not both")
    if trust_policy:
        return load_policy(trust_policy)
    if trust:
        return policy_from_roots(trust)
    return None


def _check_keys(data: dict[str, Any], source: str) -> None:
    unknown = sorted(set(data) - set(_KEYS))
    if unknown:
        raise InputError(
            f"trust policy {source!r} has unknown keys {unknown}; known keys: "
            f"{', '.join(sorted(_KEYS))}"
        )
    for key, kind in _KEYS.items():
        if key in data and (
            not isinstance(data[key], kind)
            or isinstance(data[key], bool)
            and kind is not bool
        ):
            raise InputError(
                f"trust policy {source!r}: key {key!r} has invalid value {data[key]!r}"
            )


def _strings(data: dict[str, Any], key: str, source: str) -> list[str]:
    values = data.get(key, [])
    if not all(isinstance(value, str) and value for value in values):
        raise InputError(
            f"trust policy {source!r}: every entry of {key!r} must be a non-empty string"
        )
    return values


def _load_all(
    folder: Path, names: list, key: str, source: str
) -> tuple[x509.Certificate, ...]:
    certificates: list[x509.Certificate] = []
    for name in _strings({key: names}, key, source):
        certificates.extend(load_certificates(folder / name))
    return tuple(certificates)


def _fingerprints(data: dict[str, Any], source: str) -> list[str]:
    """Normalise pinned fingerprints: hex, colons and a "sha256" prefix allowed."""
    result = []
    for value in _strings(data, "pinned_fingerprints", source):
        normal = value.lower().replace(":", "").removeprefix("sha256")
        if not _FINGERPRINT.fullmatch(normal):
            raise InputError(
                f"trust policy {source!r}: invalid pinned fingerprint {value!r}, expected "
                "the 64 hex digits of a SHA-256 certificate fingerprint"
            )
        result.append(normal)
    return result


def _check_consistency(data: dict[str, Any], source: str) -> None:
    """Reject settings that would silently do nothing."""
    sources = data.get("crl_files") or data.get("crl_urls") or data.get("ocsp")
    if data.get("revocation") == "hard-fail" and not sources:
        raise InputError(
            f'trust policy {source!r}: revocation = "hard-fail" needs crl_files, '
            "crl_urls or ocsp = true; without a source nothing is checked"
        )
    if data.get("ocsp_url") and not data.get("ocsp"):
        raise InputError(
            f"trust policy {source!r}: ocsp_url is set but ocsp is not true"
        )
    if data.get("require_timestamp") and not data.get("tsa_roots"):
        raise InputError(
            f"trust policy {source!r}: require_timestamp needs tsa_roots to verify timestamps"
        )
    for url in data.get("crl_urls", []) + (
        [data["ocsp_url"]] if data.get("ocsp_url") else []
    ):
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise InputError(
                f"trust policy {source!r}: invalid URL {url!r}, expected http:// or https://"
            )
