"""Trust: certificate chains, revocation, timestamps, key types, per-file signatures, policy.

Every case signs a real manifest and runs the real CLI; CRLs come from
files, OCSP from a real ``openssl ocsp`` responder, timestamps from a real
``openssl ts -reply`` TSA, all on 127.0.0.1.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import shutil
import time
from pathlib import Path

import pytest
from asn1crypto import cms as asn1_cms
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509 import ocsp as x509_ocsp

from relman.cas.canonical import canonical_bytes
from relman.cas.revocation import check_ocsp_response
from tests.pkitools import (
    CODE_SIGNING,
    EMAIL,
    NOW,
    OCSP_SIGNING,
    TIME_STAMPING,
    TestPki,
    resign_token,
)
from tests.support import (
    MirrorProcess,
    make_release_tree,
    openssl,
    openssl_sign,
    openssl_verify,
    publish_version,
    relman,
    relman_publish,
)
from tests.trust_servers import OcspResponder, TimestampAuthority

DAY = dt.timedelta(days=1)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict:
    """Root -> intermediate -> signers of every kind, a TSA hierarchy, and a foreign root."""
    folder = tmp_path_factory.mktemp("trust-pki")
    issuer = TestPki(folder)
    root = issuer.issue("root", ca=True)
    intermediate = issuer.issue("intermediate", issuer=root, ca=True)
    tsa_root = issuer.issue("tsa-root", ca=True)
    other_root = issuer.issue("other-root", ca=True)

    def code_signer(name: str, **options: object):  # noqa: ANN202
        return issuer.issue(
            name, intermediate, usages=CODE_SIGNING, chain=[intermediate], **options
        )

    signers = {
        "signer": code_signer("signer"),
        "expired": code_signer(
            "expired", not_before=NOW - 400 * DAY, not_after=NOW - 30 * DAY
        ),
        "revoked": code_signer("revoked"),
        "rsa": code_signer("rsa", key_kind="rsa"),
        "p384": code_signer("p384", key_kind="ec384"),
        "leaf_only": issuer.issue("leaf-only", intermediate, usages=CODE_SIGNING),
        "email": issuer.issue(
            "email", intermediate, usages=EMAIL, chain=[intermediate]
        ),
        "other": issuer.issue("other-signer", other_root, usages=CODE_SIGNING),
    }
    services = {
        "tsa": issuer.issue(
            "tsa", tsa_root, usages=TIME_STAMPING, eku_critical=True, chain=[tsa_root]
        ),
        "tsa_no_eku": issuer.issue(
            "tsa-no-eku", tsa_root, usages=CODE_SIGNING, chain=[tsa_root]
        ),
        "ocsp": issuer.issue("ocsp-responder", intermediate, usages=OCSP_SIGNING),
    }
    revocation_lists = {
        "crl_empty": issuer.crl(intermediate, [], name="intermediate-empty.crl"),
        "crl": issuer.crl(
            intermediate,
            [(signers["revoked"], NOW - 5 * DAY, x509.ReasonFlags.key_compromise)],
        ),
        "root_crl": issuer.crl(root, []),
        "tsa_crl": issuer.crl(tsa_root, []),
    }
    return {
        "folder": folder,
        "issuer": issuer,
        "root": root,
        "intermediate": intermediate,
        "tsa_root": tsa_root,
        "other_root": other_root,
        **signers,
        **services,
        **revocation_lists,
    }


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    tree = make_release_tree(tmp_path / "release", big_size=4096)
    path = tmp_path / "manifest.json"
    relman("generate", "--version", "3.0.0", "--release-dir", tree, "--output", path)
    return path


def write_policy(folder: Path, name: str = "policy.toml", **keys: object) -> Path:
    lines = []
    for key, value in keys.items():
        if isinstance(value, bool):
            lines.append(f"{key} = {'true' if value else 'false'}")
        elif isinstance(value, list):
            lines.append(f"{key} = {json.dumps([str(item) for item in value])}")
        else:
            lines.append(f"{key} = {json.dumps(str(value))}")
    path = folder / name
    path.write_text("\n".join(lines) + "\n")
    return path


def crl_policy(folder: Path, pki: dict) -> Path:
    """Write a hard-fail policy with the intermediate's CRL (revoking "revoked") and the root's."""
    return write_policy(
        folder,
        roots=[pki["root"].cert_path],
        crl_files=[pki["crl"], pki["root_crl"]],
        revocation="hard-fail",
    )


def sign(manifest: Path, issued, *extra: str) -> None:  # noqa: ANN001
    relman(
        "sign",
        "--manifest",
        manifest,
        "--key",
        issued.key_path,
        "--cert",
        issued.cert_path,
        *extra,
    )


def verify(manifest: Path, *options: str | Path):
    return relman("verify", "--manifest", manifest, *options, check=False)


def error_line(result) -> str:  # noqa: ANN001
    lines = result.stderr.strip().splitlines()
    return lines[-1] if lines else ""


# Chains.


def test_chain_through_carried_intermediate(pki: dict, manifest: Path) -> None:
    sign(manifest, pki["signer"])
    result = verify(manifest, "--trust", pki["root"].cert_path, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["signer"] == "CN=signer,O=relman test PKI"


def test_chain_missing_intermediate(pki: dict, manifest: Path, tmp_path: Path) -> None:
    sign(manifest, pki["leaf_only"])
    result = verify(manifest, "--trust", pki["root"].cert_path)
    assert result.returncode == 3
    assert error_line(result) == (
        "relman verify: certificate chain of CN=leaf-only,O=relman test PKI does not reach a trusted root"
    )
    policy = write_policy(
        tmp_path,
        roots=[pki["root"].cert_path],
        intermediates=[pki["intermediate"].cert_path],
    )
    assert verify(manifest, "--trust-policy", policy).returncode == 0


def test_chain_untrusted_root(pki: dict, manifest: Path) -> None:
    sign(manifest, pki["signer"])
    result = verify(manifest, "--trust", pki["other_root"].cert_path)
    assert result.returncode == 3
    assert "does not reach a trusted root" in error_line(result)


def test_chain_expired_signer(pki: dict, manifest: Path) -> None:
    sign(manifest, pki["expired"])
    result = verify(manifest, "--trust", pki["root"].cert_path)
    expiry = pki["expired"].certificate.not_valid_after_utc
    assert result.returncode == 3
    assert error_line(result) == (
        f"relman verify: certificate CN=expired,O=relman test PKI expired on {expiry:%Y-%m-%d}"
    )


def test_chain_wrong_extended_usage(pki: dict, manifest: Path) -> None:
    sign(manifest, pki["email"])
    result = verify(manifest, "--trust", pki["root"].cert_path)
    assert result.returncode == 3
    assert error_line(result) == (
        "relman verify: certificate CN=email,O=relman test PKI is missing the codeSigning extended key usage"
    )


# Revocation.


def test_revoked_by_crl(pki: dict, manifest: Path, tmp_path: Path) -> None:
    sign(manifest, pki["revoked"])
    policy = crl_policy(tmp_path, pki)
    result = verify(manifest, "--trust-policy", policy)
    revoked_on = (NOW - 5 * DAY).strftime("%Y-%m-%d")
    assert result.returncode == 3
    assert error_line(result) == (
        f"relman verify: certificate CN=revoked,O=relman test PKI was revoked on {revoked_on} "
        "with reason keyCompromise"
    )


def test_crl_lists_other_serial(pki: dict, manifest: Path, tmp_path: Path) -> None:
    sign(manifest, pki["signer"])
    policy = crl_policy(tmp_path, pki)
    result = verify(manifest, "--trust-policy", policy)
    assert result.returncode == 0, result.stderr


def test_hard_fail_without_crl(pki: dict, manifest: Path, tmp_path: Path) -> None:
    sign(manifest, pki["signer"])
    policy = write_policy(
        tmp_path,
        roots=[pki["root"].cert_path],
        crl_urls=["http://127.0.0.1:9/none.crl"],
        revocation="hard-fail",
    )
    result = verify(manifest, "--trust-policy", policy)
    assert result.returncode == 3
    assert (
        "revocation status of CN=signer,O=relman test PKI could not be obtained"
        in error_line(result)
    )


def test_soft_fail_without_crl(pki: dict, manifest: Path, tmp_path: Path) -> None:
    sign(manifest, pki["signer"])
    policy = write_policy(
        tmp_path,
        roots=[pki["root"].cert_path],
        crl_urls=["http://127.0.0.1:9/none.crl"],
        revocation="soft-fail",
    )
    result = verify(manifest, "--trust-policy", policy, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["notes"] == [
        "revocation status of CN=signer,O=relman test PKI unknown (soft fail)",
        "revocation status of intermediate CAs unknown (soft fail)",
    ]


def test_crl_fetched_from_mirror_url(pki: dict, tmp_path: Path) -> None:
    repo = publish_with(tmp_path, pki, "5.1.0", pki["revoked"])
    (repo / "crls").mkdir()
    shutil.copy(pki["crl"], repo / "crls" / "intermediate.crl")
    shutil.copy(pki["root_crl"], repo / "crls" / "root.crl")
    server = MirrorProcess(repo)
    try:
        policy = write_policy(
            tmp_path,
            roots=[pki["root"].cert_path],
            crl_urls=[
                f"{server.url}/crls/intermediate.crl",
                f"{server.url}/crls/root.crl",
            ],
            revocation="hard-fail",
        )
        manifest = repo / "manifests" / "5.1.0" / "manifest.json"
        result = verify(manifest, "--trust-policy", policy)
        pulled = relman(
            "pull",
            "--mirror",
            server.url,
            "--root",
            tmp_path / "node",
            "--trust-policy",
            policy,
            check=False,
        )
    finally:
        server.stop()
    assert result.returncode == 3
    assert "CN=revoked,O=relman test PKI was revoked on" in error_line(result)
    assert pulled.returncode == 3
    assert "CN=revoked,O=relman test PKI was revoked on" in error_line(pulled)


def test_pull_keeps_verified_timestamp(pki: dict, tmp_path: Path, tsa) -> None:  # noqa: ANN001
    tree = make_release_tree(tmp_path / "tree", big_size=2048)
    manifest = tmp_path / "manifest.json"
    relman(
        "generate", "--version", "7.0.0", "--release-dir", tree, "--output", manifest
    )
    sign(manifest, pki["signer"], "--tsa-url", tsa.url)
    repo = tmp_path / "repo"
    relman_publish(
        repo, manifest, tree, "--trust-policy", timestamp_policy(tmp_path, pki)
    )
    root = tmp_path / "node"
    server = MirrorProcess(repo)
    try:
        relman(
            "pull",
            "--mirror",
            server.url,
            "--root",
            root,
            "--trust-policy",
            timestamp_policy(tmp_path, pki),
        )
    finally:
        server.stop()
    stored = root / "store" / "manifests" / "7.0.0" / "manifest.json.tsr"
    status = json.loads(relman("status", "--root", root, "--json").stdout)
    checks = [row for row in status["audit"] if "object" in row]
    assert (repo / "manifests" / "7.0.0" / "manifest.json.tsr").read_bytes() == Path(
        f"{manifest}.tsr"
    ).read_bytes()
    assert stored.read_bytes() == Path(f"{manifest}.tsr").read_bytes()
    assert checks[0]["outcome"] == "verified"


@pytest.fixture(scope="module")
def ocsp(pki: dict):
    index = pki["issuer"].ocsp_index(
        [(pki["signer"], None), (pki["revoked"], NOW - 5 * DAY)]
    )
    responder = OcspResponder(
        index,
        pki["intermediate"].cert_path,
        pki["ocsp"].cert_path,
        pki["ocsp"].key_path,
    )
    yield responder
    responder.stop()


def test_ocsp_good_status(pki: dict, manifest: Path, tmp_path: Path, ocsp) -> None:  # noqa: ANN001
    sign(manifest, pki["signer"])
    policy = write_policy(
        tmp_path,
        roots=[pki["root"].cert_path],
        ocsp=True,
        ocsp_url=ocsp.url,
        crl_files=[pki["root_crl"]],
        revocation="hard-fail",
    )
    result = verify(manifest, "--trust-policy", policy)
    assert result.returncode == 0, result.stderr


def test_ocsp_revoked_status(pki: dict, manifest: Path, tmp_path: Path, ocsp) -> None:  # noqa: ANN001
    sign(manifest, pki["revoked"])
    policy = write_policy(
        tmp_path,
        roots=[pki["root"].cert_path],
        ocsp=True,
        ocsp_url=ocsp.url,
        crl_files=[pki["root_crl"]],
        revocation="hard-fail",
    )
    result = verify(manifest, "--trust-policy", policy)
    assert result.returncode == 3
    assert "CN=revoked,O=relman test PKI was revoked on" in error_line(result)
    assert "keyCompromise" in error_line(result) or "key_compromise" in error_line(
        result
    )


def test_ocsp_unreachable_soft_fail(pki: dict, manifest: Path, tmp_path: Path) -> None:
    sign(manifest, pki["signer"])
    policy = write_policy(
        tmp_path,
        roots=[pki["root"].cert_path],
        ocsp=True,
        ocsp_url="http://127.0.0.1:9/",
    )
    assert verify(manifest, "--trust-policy", policy).returncode == 0
    hard = write_policy(
        tmp_path,
        name="hard.toml",
        roots=[pki["root"].cert_path],
        ocsp=True,
        ocsp_url="http://127.0.0.1:9/",
        revocation="hard-fail",
    )
    result = verify(manifest, "--trust-policy", hard)
    assert result.returncode == 3
    assert "could not be obtained" in error_line(result)


# Timestamps.


@pytest.fixture(scope="module")
def tsa(pki: dict, tmp_path_factory):
    authority = TimestampAuthority(
        tmp_path_factory.mktemp("tsa"), pki["tsa"].cert_path, pki["tsa"].key_path
    )
    yield authority
    authority.stop()


def timestamp_policy(folder: Path, pki: dict, **extra: object) -> Path:
    return write_policy(
        folder,
        roots=[pki["root"].cert_path],
        tsa_roots=[pki["tsa_root"].cert_path],
        **extra,
    )


def test_sign_writes_timestamp(pki: dict, manifest: Path, tmp_path: Path, tsa) -> None:  # noqa: ANN001
    sign(
        manifest,
        pki["signer"],
        "--tsa-url",
        tsa.url,
        "--tsa-roots",
        pki["tsa_root"].cert_path,
    )
    token = Path(str(manifest).removesuffix(".json") + ".json.tsr")
    assert token.is_file()
    result = verify(
        manifest, "--trust-policy", timestamp_policy(tmp_path, pki), "--json"
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["timestamp"] is not None
    replay = openssl("ts", "-reply", "-in", token, "-text")
    assert "Nonce" in replay.stdout


def test_expired_signer_with_timestamp(
    pki: dict, manifest: Path, tmp_path: Path, tsa
) -> None:  # noqa: ANN001
    short = pki["issuer"].issue(
        "short-lived",
        pki["intermediate"],
        usages=CODE_SIGNING,
        chain=[pki["intermediate"]],
        not_before=NOW - DAY,
        not_after=dt.datetime.now(dt.UTC) + dt.timedelta(seconds=4),
    )
    sign(manifest, short, "--tsa-url", tsa.url)
    time.sleep(
        max(
            0.0,
            (
                short.certificate.not_valid_after_utc - dt.datetime.now(dt.UTC)
            ).total_seconds(),
        )
        + 1.5
    )
    accepted = verify(manifest, "--trust-policy", timestamp_policy(tmp_path, pki))
    Path(f"{manifest}.tsr").unlink()
    rejected = verify(manifest, "--trust-policy", timestamp_policy(tmp_path, pki))
    assert accepted.returncode == 0, accepted.stderr
    assert rejected.returncode == 3
    assert "CN=short-lived,O=relman test PKI expired on" in error_line(rejected)


def test_revoked_before_timestamp_rejected(
    pki: dict, manifest: Path, tmp_path: Path, tsa
) -> None:  # noqa: ANN001
    sign(manifest, pki["revoked"], "--tsa-url", tsa.url)
    policy = timestamp_policy(
        tmp_path,
        pki,
        crl_files=[pki["crl"], pki["root_crl"], pki["tsa_crl"]],
        revocation="hard-fail",
    )
    result = verify(manifest, "--trust-policy", policy)
    assert result.returncode == 3
    assert "CN=revoked,O=relman test PKI was revoked on" in error_line(result)


def test_timestamp_over_other_data(
    pki: dict, manifest: Path, tmp_path: Path, tsa
) -> None:  # noqa: ANN001
    other = tmp_path / "other.json"
    shutil.copy(manifest, other)
    sign(other, pki["signer"], "--tsa-url", tsa.url)
    sign(manifest, pki["signer"])
    shutil.copy(f"{other}.tsr", f"{manifest}.tsr")
    result = verify(manifest, "--trust-policy", timestamp_policy(tmp_path, pki))
    assert result.returncode == 3
    assert error_line(result) == (
        "relman verify: timestamp does not cover this signature: its message imprint differs"
    )


def test_tsa_without_time_stamping(
    pki: dict, manifest: Path, tmp_path: Path, tsa
) -> None:  # noqa: ANN001
    sign(manifest, pki["signer"], "--tsa-url", tsa.url)
    response = Path(f"{manifest}.tsr")
    openssl(
        "ts", "-reply", "-in", response, "-token_out", "-out", tmp_path / "token.der"
    )
    response.write_bytes(
        resign_token((tmp_path / "token.der").read_bytes(), pki["tsa_no_eku"])
    )
    result = verify(manifest, "--trust-policy", timestamp_policy(tmp_path, pki))
    assert result.returncode == 3
    assert error_line(result) == (
        "relman verify: certificate CN=tsa-no-eku,O=relman test PKI is missing the "
        "timeStamping extended key usage"
    )


def test_bare_token_accepted(pki: dict, manifest: Path, tmp_path: Path, tsa) -> None:  # noqa: ANN001
    sign(manifest, pki["signer"], "--tsa-url", tsa.url)
    response = Path(f"{manifest}.tsr")
    token = openssl(
        "ts", "-reply", "-in", response, "-token_out", "-out", tmp_path / "token.der"
    )
    assert token.returncode == 0, token.stderr
    shutil.copy(tmp_path / "token.der", response)
    result = verify(
        manifest, "--trust-policy", timestamp_policy(tmp_path, pki), "--json"
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["timestamp"] is not None


def test_embedded_token_accepted(
    pki: dict, manifest: Path, tmp_path: Path, tsa
) -> None:  # noqa: ANN001
    sign(manifest, pki["signer"], "--tsa-url", tsa.url)
    response = Path(f"{manifest}.tsr")
    openssl(
        "ts", "-reply", "-in", response, "-token_out", "-out", tmp_path / "token.der"
    )
    signature_path = Path(f"{manifest}.sig")
    info = asn1_cms.ContentInfo.load(signature_path.read_bytes())
    signer_info = info["content"]["signer_infos"][0]
    token = asn1_cms.ContentInfo.load((tmp_path / "token.der").read_bytes())
    signer_info["unsigned_attrs"] = [
        {"type": "signature_time_stamp_token", "values": [token]}
    ]
    signature_path.write_bytes(info.dump(force=True))
    response.unlink()
    result = verify(
        manifest, "--trust-policy", timestamp_policy(tmp_path, pki), "--json"
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["timestamp"] is not None


def test_required_timestamp_missing(pki: dict, manifest: Path, tmp_path: Path) -> None:
    sign(manifest, pki["signer"])
    result = verify(
        manifest,
        "--trust-policy",
        timestamp_policy(tmp_path, pki, require_timestamp=True),
    )
    assert result.returncode == 3
    assert (
        error_line(result)
        == "relman verify: the trust policy requires a timestamp, and the signature has none"
    )


# Key types and digests.


@pytest.mark.parametrize(
    ("name", "extra"),
    [
        ("rsa", []),
        ("rsa", ["--rsa-pss"]),
        ("p384", ["--digest", "sha384"]),
        ("signer", ["--digest", "sha512"]),
    ],
    ids=["rsa-pkcs1", "rsa-pss", "ecdsa-p384", "ecdsa-p256-sha512"],
)
def test_key_types_relman_signs(
    pki: dict, manifest: Path, name: str, extra: list[str]
) -> None:
    sign(manifest, pki[name], *extra)
    assert verify(manifest, "--trust", pki["root"].cert_path).returncode == 0
    checked = openssl_verify(f"{manifest}.sig", manifest, pki["root"].cert_path)
    assert checked.returncode == 0, checked.stderr


@pytest.mark.parametrize(
    "options",
    [[], ["-keyopt", "rsa_padding_mode:pss"], ["-md", "sha384"]],
    ids=["pkcs1", "pss", "sha384"],
)
def test_key_types_openssl_signs(pki: dict, manifest: Path, options: list[str]) -> None:
    rsa_signer = pki["rsa"]
    result = openssl_sign(
        manifest,
        rsa_signer.cert_path,
        rsa_signer.key_path,
        "-certfile",
        pki["intermediate"].cert_path,
        *options,
    )
    assert result.returncode == 0, result.stderr
    checked = verify(manifest, "--trust", pki["root"].cert_path)
    assert checked.returncode == 0, checked.stderr


def test_sha1_signature_rejected(pki: dict, manifest: Path) -> None:
    signer = pki["signer"]
    result = openssl_sign(manifest, signer.cert_path, signer.key_path, "-md", "sha1")
    assert result.returncode == 0, result.stderr
    checked = verify(manifest, "--trust", pki["root"].cert_path)
    assert checked.returncode == 3
    assert error_line(checked) == (
        "relman verify: signature uses the SHA1 digest, which is too weak; re-sign with SHA-256 or stronger"
    )


def test_ber_signature_accepted(pki: dict, manifest: Path) -> None:
    signer = pki["signer"]
    result = openssl_sign(
        manifest,
        signer.cert_path,
        signer.key_path,
        "-stream",
        "-certfile",
        pki["intermediate"].cert_path,
    )
    assert result.returncode == 0, result.stderr
    assert Path(f"{manifest}.sig").read_bytes()[1] == 0x80  # indefinite length: BER
    assert verify(manifest, "--trust", pki["root"].cert_path).returncode == 0


def test_one_byte_change_rejected(pki: dict, manifest: Path) -> None:
    sign(manifest, pki["signer"])
    body = manifest.read_bytes()
    manifest.write_bytes(body.replace(b'"v3.0.0"', b'"v3.0.1"'))
    result = verify(manifest, "--trust", pki["root"].cert_path)
    assert result.returncode == 3
    assert "signature does not cover this manifest" in error_line(result)


# Policy file.


def test_policy_pinned_signer(pki: dict, manifest: Path, tmp_path: Path) -> None:
    sign(manifest, pki["signer"])
    fingerprint = pki["signer"].certificate.fingerprint(hashes.SHA256()).hex()
    pinned = write_policy(
        tmp_path, roots=[pki["root"].cert_path], pinned_fingerprints=[fingerprint]
    )
    assert verify(manifest, "--trust-policy", pinned).returncode == 0
    by_subject = write_policy(
        tmp_path,
        name="subject.toml",
        roots=[pki["root"].cert_path],
        pinned_subjects=["CN=rsa,O=relman test PKI"],
    )
    result = verify(manifest, "--trust-policy", by_subject)
    assert result.returncode == 3
    assert "is not one of the pinned signers" in error_line(result)


def test_policy_unknown_key(pki: dict, manifest: Path, tmp_path: Path) -> None:
    sign(manifest, pki["signer"])
    policy = write_policy(
        tmp_path, roots=[pki["root"].cert_path], root_certificates=["x"]
    )
    result = verify(manifest, "--trust-policy", policy)
    assert result.returncode == 1
    assert "unknown keys ['root_certificates']" in error_line(result)


def test_policy_rejects_leaf_as_root(pki: dict, manifest: Path) -> None:
    sign(manifest, pki["signer"])
    result = verify(manifest, "--trust", pki["leaf_only"].cert_path)
    assert result.returncode == 1
    assert "is not a CA certificate" in error_line(result)


# Audit log and cache.


def test_audit_log_records_outcomes(pki: dict, manifest: Path, tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    sign(manifest, pki["signer"])
    verify(manifest, "--trust", pki["root"].cert_path, "--audit-log", log)
    verify(manifest, "--trust", pki["other_root"].cert_path, "--audit-log", log)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    fingerprint = pki["signer"].certificate.fingerprint(hashes.SHA256()).hex()
    assert [record["outcome"] for record in records] == ["verified", "rejected"]
    assert {record["signer_fingerprint"] for record in records} == {fingerprint}
    assert "does not reach a trusted root" in records[1]["reason"]


# Per-file signatures and the node.


@pytest.fixture
def signed_files_repo(pki: dict, tmp_path: Path) -> dict:
    tree = make_release_tree(tmp_path / "tree", big_size=2048)
    manifest = tmp_path / "manifest.json"
    signer = pki["signer"]
    relman(
        "generate",
        "--version",
        "4.0.0",
        "--release-dir",
        tree,
        "--output",
        manifest,
        "--sign-files",
        "--key",
        signer.key_path,
        "--cert",
        signer.cert_path,
    )
    return {"tree": tree, "manifest": manifest, "repo": tmp_path / "repo"}


def publish(setup: dict, pki: dict) -> None:
    sign(setup["manifest"], pki["signer"])
    relman_publish(
        setup["repo"],
        setup["manifest"],
        setup["tree"],
        "--trust",
        pki["root"].cert_path,
    )


def test_file_signatures_verify_on_apply(
    pki: dict, signed_files_repo: dict, tmp_path: Path
) -> None:
    body = json.loads(signed_files_repo["manifest"].read_bytes())
    assert all(entry["file_signature"] for entry in body["files"])
    publish(signed_files_repo, pki)
    server = MirrorProcess(signed_files_repo["repo"])
    root = tmp_path / "node"
    try:
        relman(
            "pull",
            "--mirror",
            server.url,
            "--root",
            root,
            "--trust",
            pki["root"].cert_path,
        )
    finally:
        server.stop()
    result = relman("apply", "--root", root, "--version", "4.0.0", check=False)
    assert result.returncode == 0, result.stderr


def test_tampered_file_signature(
    pki: dict, signed_files_repo: dict, tmp_path: Path
) -> None:
    body = json.loads(signed_files_repo["manifest"].read_bytes())
    first, second = body["files"][0], body["files"][1]
    first["file_signature"] = second["file_signature"]
    signed_files_repo["manifest"].write_bytes(canonical_bytes(body))
    publish(signed_files_repo, pki)
    server = MirrorProcess(signed_files_repo["repo"])
    root = tmp_path / "node"
    try:
        relman(
            "pull",
            "--mirror",
            server.url,
            "--root",
            root,
            "--trust",
            pki["root"].cert_path,
        )
    finally:
        server.stop()
    result = relman("apply", "--root", root, "--version", "4.0.0", check=False)
    assert result.returncode == 3
    assert error_line(result) == (
        f"relman apply: file signature of {first['path']!r} is invalid: signature does not "
        "cover this file: its messageDigest differs from the file's digest (the file changed "
        "after signing, or the signature belongs to something else)"
    )
    assert not (root / "releases" / "4.0.0").exists()
    assert not (root / "current").exists()


def test_file_signature_openssl_verifies(pki: dict, signed_files_repo: dict) -> None:
    body = json.loads(signed_files_repo["manifest"].read_bytes())
    entry = next(item for item in body["files"] if item["type"] != "symlink")
    signature = signed_files_repo["tree"].parent / "file.sig"
    signature.write_bytes(base64.b64decode(entry["file_signature"]))
    result = openssl_verify(
        signature, signed_files_repo["tree"] / entry["path"], pki["root"].cert_path
    )
    assert result.returncode == 0, result.stderr


def publish_with(tmp_path: Path, pki: dict, version: str, signer) -> Path:  # noqa: ANN001
    """Publish a small release signed by ``signer`` into tmp_path/repo."""
    tree = make_release_tree(tmp_path / "tree", big_size=2048)
    repo = tmp_path / "repo"
    publish_version(
        tmp_path,
        pki["folder"],
        repo,
        version,
        tree,
        key=signer.key_path,
        cert=signer.cert_path,
        trust=pki["root"].cert_path,
    )
    return repo


def test_pull_rejects_revoked_signer(pki: dict, tmp_path: Path) -> None:
    repo = publish_with(tmp_path, pki, "5.0.0", pki["revoked"])
    policy = crl_policy(tmp_path, pki)
    root = tmp_path / "node"
    server = MirrorProcess(repo)
    try:
        result = relman(
            "pull",
            "--mirror",
            server.url,
            "--root",
            root,
            "--trust-policy",
            policy,
            check=False,
        )
        blobs = [
            path for path in (root / "store" / "objects").rglob("*") if path.is_file()
        ]
        status = json.loads(relman("status", "--root", root, "--json").stdout)
    finally:
        server.stop()
    assert result.returncode == 3
    assert "was revoked on" in error_line(result)
    assert blobs == []
    assert status["pulled"] == []
    assert status["audit"][0]["outcome"] == "rejected"


def test_pull_uses_signature_cache(pki: dict, tmp_path: Path) -> None:
    repo = publish_with(tmp_path, pki, "6.0.0", pki["signer"])
    crl = tmp_path / "intermediate.crl"
    shutil.copy(pki["crl_empty"], crl)
    policy = write_policy(
        tmp_path, roots=[pki["root"].cert_path], crl_files=[crl, pki["root_crl"]]
    )
    root = tmp_path / "node"
    server = MirrorProcess(repo)
    try:
        relman("pull", "--mirror", server.url, "--root", root, "--trust-policy", policy)
        relman("pull", "--mirror", server.url, "--root", root, "--trust-policy", policy)
        revoked_crl = pki["issuer"].crl(
            pki["intermediate"],
            [(pki["signer"], NOW - DAY, x509.ReasonFlags.superseded)],
            name="signer-revoked.crl",
        )
        shutil.copy(revoked_crl, crl)
        third = relman(
            "pull",
            "--mirror",
            server.url,
            "--root",
            root,
            "--trust-policy",
            policy,
            check=False,
        )
    finally:
        server.stop()
    status = json.loads(relman("status", "--root", root, "--json").stdout)
    reasons = [row["reason"] for row in status["audit"] if "object" in row]
    assert third.returncode == 3
    assert "was revoked on" in error_line(third)
    assert reasons[:3] == [reasons[0], "cached result", "all checks passed"]
    assert "was revoked on" in reasons[0]


# Regressions found by attacking the verifier.


def test_look_alike_issuer_keeps_revocation(
    pki: dict, manifest: Path, tmp_path: Path
) -> None:
    """A carried certificate named like the intermediate must not hide its revocation."""
    look_alike = pki["issuer"].issue(
        "look-alike", pki["other_root"], ca=True, common_name="intermediate"
    )
    carried = tmp_path / "carried.pem"
    carried.write_bytes(
        look_alike.cert_path.read_bytes() + pki["intermediate"].cert_path.read_bytes()
    )
    revoking_root = pki["issuer"].crl(
        pki["root"],
        [(pki["intermediate"], NOW - DAY, x509.ReasonFlags.key_compromise)],
        name="root-revokes-intermediate.crl",
    )
    signer = pki["signer"]
    result = openssl_sign(
        manifest, signer.cert_path, signer.key_path, "-certfile", carried
    )
    assert result.returncode == 0, result.stderr
    policy = write_policy(
        tmp_path,
        roots=[pki["root"].cert_path],
        crl_files=[pki["crl_empty"], revoking_root],
        revocation="hard-fail",
    )
    checked = verify(manifest, "--trust-policy", policy)
    assert checked.returncode == 3
    assert "CN=intermediate,O=relman test PKI was revoked on" in error_line(checked)


def test_crl_newer_than_timestamp_accepted(
    pki: dict, manifest: Path, tmp_path: Path, tsa
) -> None:  # noqa: ANN001
    sign(manifest, pki["signer"], "--tsa-url", tsa.url)
    later = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=2)
    fresh = [
        pki["issuer"].crl(
            pki["intermediate"], [], name="fresh-intermediate.crl", last_update=later
        ),
        pki["issuer"].crl(pki["root"], [], name="fresh-root.crl", last_update=later),
        pki["issuer"].crl(pki["tsa_root"], [], name="fresh-tsa.crl", last_update=later),
    ]
    time.sleep(3)
    policy = timestamp_policy(tmp_path, pki, crl_files=fresh, revocation="hard-fail")
    result = verify(manifest, "--trust-policy", policy, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["timestamp"] is not None


def test_expired_crl_not_used(pki: dict, manifest: Path, tmp_path: Path, tsa) -> None:  # noqa: ANN001
    sign(manifest, pki["revoked"], "--tsa-url", tsa.url)
    stale = pki["issuer"].crl(
        pki["intermediate"],
        [],
        name="stale.crl",
        last_update=NOW - 10 * DAY,
        next_update=NOW - 3 * DAY,
    )
    policy = timestamp_policy(
        tmp_path,
        pki,
        crl_files=[stale, pki["root_crl"], pki["tsa_crl"]],
        revocation="hard-fail",
    )
    result = verify(manifest, "--trust-policy", policy)
    assert result.returncode == 3
    assert "could not be obtained" in error_line(result)
    assert "stale.crl' expired at" in error_line(
        result
    ) or "stale.crl expired at" in error_line(result)


def test_compromised_tsa_voids_tokens(
    pki: dict, manifest: Path, tmp_path: Path, tsa
) -> None:  # noqa: ANN001
    sign(manifest, pki["signer"], "--tsa-url", tsa.url)
    compromised = pki["issuer"].crl(
        pki["tsa_root"],
        [
            (
                pki["tsa"],
                dt.datetime.now(dt.UTC) + dt.timedelta(minutes=1),
                x509.ReasonFlags.key_compromise,
            )
        ],
        name="tsa-compromised.crl",
    )
    policy = timestamp_policy(
        tmp_path, pki, crl_files=[pki["crl_empty"], pki["root_crl"], compromised]
    )
    result = verify(manifest, "--trust-policy", policy)
    assert result.returncode == 3
    assert "CN=tsa,O=relman test PKI was revoked on" in error_line(result)
    assert "keyCompromise" in error_line(result)


def test_stale_timestamp_file_rejected(pki: dict, manifest: Path, tsa) -> None:  # noqa: ANN001
    sign(manifest, pki["signer"], "--tsa-url", tsa.url)
    token = Path(f"{manifest}.tsr").read_bytes()
    sign(manifest, pki["signer"])
    assert not Path(f"{manifest}.tsr").exists()
    Path(f"{manifest}.tsr").write_bytes(token)
    result = verify(manifest, "--trust", pki["root"].cert_path)
    assert result.returncode == 3
    assert "timestamp does not cover this signature" in error_line(result)


def test_weak_rsa_key_rejected(pki: dict, manifest: Path) -> None:
    weak = pki["issuer"].issue(
        "weak",
        pki["intermediate"],
        usages=CODE_SIGNING,
        chain=[pki["intermediate"]],
        key_kind="rsa1024",
    )
    sign(manifest, weak)
    result = verify(manifest, "--trust", pki["root"].cert_path)
    assert result.returncode == 3
    assert error_line(result) == (
        "relman verify: the RSA key of CN=weak,O=relman test PKI has 1024 bits, which is too weak; use at least 2048"
    )


def test_pem_signature_accepted(pki: dict, manifest: Path) -> None:
    signer = pki["signer"]
    result = openssl_sign(
        manifest,
        signer.cert_path,
        signer.key_path,
        "-certfile",
        pki["intermediate"].cert_path,
        outform="PEM",
    )
    assert result.returncode == 0, result.stderr
    assert verify(manifest, "--trust", pki["root"].cert_path).returncode == 0


def test_trailing_bytes_rejected(pki: dict, manifest: Path) -> None:
    sign(manifest, pki["signer"])
    signature = Path(f"{manifest}.sig")
    signature.write_bytes(signature.read_bytes() + b"\x00")
    result = verify(manifest, "--trust", pki["root"].cert_path)
    assert result.returncode == 3
    assert "not a valid CMS SignedData" in error_line(result)


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"pinned_fingerprints": ["zz"]}, "invalid pinned fingerprint 'zz'"),
        ({"revocation": "hard-fail"}, "needs crl_files, crl_urls or ocsp = true"),
        ({"ocsp_url": "http://127.0.0.1:9/"}, "ocsp_url is set but ocsp is not true"),
        ({"require_timestamp": True}, "require_timestamp needs tsa_roots"),
        ({"crl_urls": ["inter.crl"]}, "invalid URL 'inter.crl'"),
    ],
)
def test_policy_rejects_useless_settings(
    pki: dict, tmp_path: Path, manifest: Path, keys: dict, message: str
) -> None:
    sign(manifest, pki["signer"])
    policy = write_policy(tmp_path, roots=[pki["root"].cert_path], **keys)
    result = verify(manifest, "--trust-policy", policy)
    assert result.returncode == 1
    assert message in error_line(result)


def test_policy_rejects_infinite_timeout(
    pki: dict, tmp_path: Path, manifest: Path
) -> None:
    sign(manifest, pki["signer"])
    policy = tmp_path / "policy.toml"
    policy.write_text(f'roots = ["{pki["root"].cert_path}"]\nfetch_timeout = inf\n')
    result = verify(manifest, "--trust-policy", policy)
    assert result.returncode == 1
    assert "invalid fetch_timeout inf" in error_line(result)


def test_file_signatures_respect_pins(pki: dict, tmp_path: Path) -> None:
    tree = make_release_tree(tmp_path / "tree", big_size=2048)
    manifest = tmp_path / "manifest.json"
    relman(
        "generate",
        "--version",
        "8.0.0",
        "--release-dir",
        tree,
        "--output",
        manifest,
        "--sign-files",
        "--key",
        pki["rsa"].key_path,
        "--cert",
        pki["rsa"].cert_path,
    )
    setup = {"tree": tree, "manifest": manifest, "repo": tmp_path / "repo"}
    publish(setup, pki)
    server = MirrorProcess(setup["repo"])
    root = tmp_path / "node"
    try:
        relman(
            "pull",
            "--mirror",
            server.url,
            "--root",
            root,
            "--trust",
            pki["root"].cert_path,
        )
    finally:
        server.stop()
    fingerprint = pki["signer"].certificate.fingerprint(hashes.SHA256()).hex()
    pinned = write_policy(
        tmp_path, roots=[pki["root"].cert_path], pinned_fingerprints=[fingerprint]
    )
    result = relman(
        "apply",
        "--root",
        root,
        "--version",
        "8.0.0",
        "--trust-policy",
        pinned,
        check=False,
    )
    assert result.returncode == 3
    assert "CN=rsa,O=relman test PKI" in error_line(result)
    assert "is not one of the pinned signers" in error_line(result)
    assert not (root / "current").exists()


def test_ocsp_without_next_update_expires(pki: dict) -> None:
    builder = (
        x509_ocsp.OCSPResponseBuilder()
        .add_response(
            cert=pki["signer"].certificate,
            issuer=pki["intermediate"].certificate,
            algorithm=hashes.SHA1(),
            cert_status=x509_ocsp.OCSPCertStatus.GOOD,
            this_update=dt.datetime.now(dt.UTC) - dt.timedelta(hours=1),
            next_update=None,
            revocation_time=None,
            revocation_reason=None,
        )
        .responder_id(
            x509_ocsp.OCSPResponderEncoding.HASH, pki["intermediate"].certificate
        )
    )
    response = builder.sign(pki["intermediate"].key, hashes.SHA256())
    with pytest.raises(ValueError, match="has no nextUpdate"):
        check_ocsp_response(
            response, pki["signer"].certificate, pki["intermediate"].certificate
        )
