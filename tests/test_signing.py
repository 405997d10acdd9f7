"""pki init, sign and verify, and interoperability with the openssl command."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from tests.support import (
    make_release_tree,
    openssl,
    openssl_sign,
    openssl_verify,
    relman,
    relman_sign,
)


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("other-pki")
    relman("pki", "init", folder)
    return folder


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    tree = make_release_tree(tmp_path / "release", big_size=1024)
    output = tmp_path / "manifest.json"
    relman("generate", "--version", "2.0.0", "--release-dir", tree, "--output", output)
    return output


def test_pki_init_writes_files(pki: Path) -> None:
    assert sorted(path.name for path in pki.iterdir()) == [
        "ca.key",
        "ca.pem",
        "signer.key",
        "signer.pem",
    ]
    assert stat.S_IMODE((pki / "ca.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((pki / "signer.key").stat().st_mode) == 0o600


def test_pki_signer_has_code_signing(pki: Path) -> None:
    signer = x509.load_pem_x509_certificate((pki / "signer.pem").read_bytes())
    root = x509.load_pem_x509_certificate((pki / "ca.pem").read_bytes())
    usage = signer.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CODE_SIGNING]
    assert signer.issuer == root.subject
    assert (
        root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    )
    signer.verify_directly_issued_by(root)


def test_pki_init_keeps_existing(pki: Path) -> None:
    before = (pki / "ca.key").read_bytes()
    result = relman("pki", "init", pki, check=False)
    assert result.returncode == 1
    assert "already exist" in result.stderr
    assert "--force" in result.stderr
    assert (pki / "ca.key").read_bytes() == before


def test_pki_help_says_tests_only() -> None:
    result = relman("pki", "init", "--help")
    assert "tests and demos only" in result.stdout


def test_sign_then_verify(pki: Path, manifest: Path) -> None:
    relman_sign(manifest, pki)
    result = relman(
        "verify", "--manifest", manifest, "--trust", pki / "ca.pem", "--json"
    )
    report = json.loads(result.stdout)
    assert report["verified"] is True
    assert report["version"] == "2.0.0"
    assert "relman development signer" in report["signer"]


def test_relman_signature_verifies_with_openssl(pki: Path, manifest: Path) -> None:
    relman_sign(manifest, pki)
    result = openssl_verify(f"{manifest}.sig", manifest, pki / "ca.pem")
    assert result.returncode == 0, result.stderr
    assert "Verification successful" in result.stderr


def test_relman_signature_has_signed_attributes(pki: Path, manifest: Path) -> None:
    relman_sign(manifest, pki)
    result = openssl(
        "cms", "-cmsout", "-print", "-inform", "DER", "-in", f"{manifest}.sig"
    )
    assert result.returncode == 0, result.stderr
    assert "messageDigest" in result.stdout
    assert "sha256" in result.stdout
    assert "relman development signer" in result.stdout


@pytest.mark.parametrize("stream", [False, True], ids=["der", "ber-stream"])
def test_openssl_signature_verifies_with_relman(
    pki: Path, manifest: Path, stream: bool
) -> None:
    extra = ["-stream"] if stream else []
    result = openssl_sign(manifest, pki / "signer.pem", pki / "signer.key", *extra)
    assert result.returncode == 0, result.stderr
    verified = relman("verify", "--manifest", manifest, "--trust", pki / "ca.pem")
    assert verified.stdout.startswith("verified: version 2.0.0")


def test_verify_rejects_changed_manifest(pki: Path, manifest: Path) -> None:
    relman_sign(manifest, pki)
    body = manifest.read_bytes()
    manifest.write_bytes(body.replace(b'"v2.0.0"', b'"v2.0.1"'))
    result = relman(
        "verify", "--manifest", manifest, "--trust", pki / "ca.pem", check=False
    )
    assert result.returncode == 3
    assert "does not cover this manifest" in result.stderr


def test_verify_rejects_untrusted_root(
    pki: Path, other_pki: Path, manifest: Path
) -> None:
    relman_sign(manifest, pki)
    result = relman(
        "verify", "--manifest", manifest, "--trust", other_pki / "ca.pem", check=False
    )
    assert result.returncode == 3
    assert "does not reach a trusted root" in result.stderr


def test_verify_rejects_garbage_signature(pki: Path, manifest: Path) -> None:
    Path(f"{manifest}.sig").write_bytes(b"not a signature")
    result = relman(
        "verify", "--manifest", manifest, "--trust", pki / "ca.pem", check=False
    )
    assert result.returncode == 3
    assert "not a valid CMS SignedData" in result.stderr


def test_sign_rejects_mismatched_key(
    pki: Path, other_pki: Path, manifest: Path
) -> None:
    result = relman(
        "sign",
        "--manifest",
        manifest,
        "--key",
        other_pki / "signer.key",
        "--cert",
        pki / "signer.pem",
        check=False,
    )
    assert result.returncode == 1
    assert "does not belong to the first certificate" in result.stderr
    assert not Path(f"{manifest}.sig").exists()


def test_sign_rejects_non_manifest(pki: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.json"
    other.write_text('{"hello": 1}')
    result = relman(
        "sign",
        "--manifest",
        other,
        "--key",
        pki / "signer.key",
        "--cert",
        pki / "signer.pem",
        check=False,
    )
    assert result.returncode == 3
    assert "unknown keys" in result.stderr
    assert not Path(f"{other}.sig").exists()
