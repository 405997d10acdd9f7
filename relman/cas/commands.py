"""Subcommands that work on files and repositories: pki, generate, sign, verify, publish, reindex."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from relman.cas.audit import AuditFile
from relman.cas.canonical import sha256_hex
from relman.cas.cli_options import (
    add_audit_option,
    add_trust_options,
    policy_from,
    positive_int,
    timestamp_from,
)
from relman.cas.cms import DIGESTS, parse_signature, sign_detached
from relman.cas.console import emit, format_bytes, progress_bar
from relman.cas.errors import InputError, ManifestError
from relman.cas.fsutil import atomic_write_bytes
from relman.cas.generate import (
    ReleaseInfo,
    build_manifest,
    parse_release_date,
    sign_files,
)
from relman.cas.manifest import Manifest, parse_manifest_bytes
from relman.cas.pki import init_pki, load_certificates
from relman.cas.policy import TrustPolicy
from relman.cas.publish import publish_release
from relman.cas.repository import Repository
from relman.cas.timestamp import request_timestamp, verify_timestamp
from relman.cas.verify import verify_signature

logger = logging.getLogger(__name__)


def register(subcommands: argparse._SubParsersAction) -> None:
    _register_pki(subcommands)
    _register_generate(subcommands)
    _register_sign(subcommands)
    _register_verify(subcommands)
    _register_publish(subcommands)
    _register_reindex(subcommands)


def read_manifest(path: str) -> tuple[bytes, Manifest]:
    """Read and parse a manifest file; errors name the file."""
    body = read_file(path, "manifest")
    try:
        return body, parse_manifest_bytes(body)
    except ManifestError as error:
        raise ManifestError(f"{path}: {error}") from error


def read_file(path: str, what: str) -> bytes:
    """Read a whole file, raising InputError that names ``what`` and the path."""
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise InputError(f"cannot read {what} {path!r}: {error.strerror}") from error


# pki init


def _register_pki(subcommands: argparse._SubParsersAction) -> None:
    pki = subcommands.add_parser(
        "pki",
        help="development PKI for tests and demos",
        description="Development PKI.",
    )
    actions = pki.add_subparsers(dest="pki_command", metavar="ACTION", required=True)
    init = actions.add_parser(
        "init",
        help="create a root CA and a code-signing certificate (tests and demos only)",
        description=(
            "Write DIR/ca.pem, DIR/ca.key, DIR/signer.pem and DIR/signer.key: a root "
            "CA and a code-signing certificate issued by it, on ECDSA P-256 keys. "
            "The keys are unencrypted (mode 0600). For tests and demos only: sign "
            "real releases with keys from your organisation's PKI."
        ),
    )
    init.add_argument(
        "folder", metavar="DIR", help="folder to write the four files into"
    )
    init.add_argument("--force", action="store_true", help="replace existing files")
    init.add_argument("--json", action="store_true", help="print the result as JSON")
    init.set_defaults(handler=_run_pki_init)


def _run_pki_init(arguments: argparse.Namespace) -> int:
    paths = init_pki(arguments.folder, force=arguments.force)
    lines = [f"wrote {path}" for path in paths.values()]
    lines.append("for tests and demos only: the keys are not encrypted")
    emit(
        {name: str(path) for name, path in paths.items()},
        "\n".join(lines),
        arguments.json,
    )
    return 0


# generate


def _register_generate(subcommands: argparse._SubParsersAction) -> None:
    generate = subcommands.add_parser(
        "generate",
        help="scan a release folder and write its manifest",
        description=(
            "Scan DIR, hash every file with SHA-256 and write the manifest in RFC 8785 "
            "canonical JSON. The same tree gives byte-identical output. Symlinks are "
            "recorded as symlinks and must stay inside DIR; sockets, fifos and "
            "devices are rejected."
        ),
    )
    generate.add_argument(
        "--version", required=True, help="release version (semantic version)"
    )
    generate.add_argument(
        "--release-dir", required=True, metavar="DIR", help="release folder"
    )
    generate.add_argument(
        "--output", required=True, metavar="FILE", help="manifest file to write"
    )
    generate.add_argument("--tag-name", help="tag name (default: v plus the version)")
    notes = generate.add_mutually_exclusive_group()
    notes.add_argument("--release-notes", default="", help="release notes text")
    notes.add_argument(
        "--release-notes-file", metavar="FILE", help="read release notes from FILE"
    )
    generate.add_argument(
        "--release-date",
        help="ISO 8601 date-time, UTC when it has no offset (default: "
        "SOURCE_DATE_EPOCH, else the newest file time)",
    )
    generate.add_argument(
        "--critical", action="store_true", help="mark as a critical update"
    )
    generate.add_argument(
        "--min-upgrade-from",
        metavar="VERSION",
        help="oldest version that may upgrade to this one",
    )
    generate.add_argument(
        "--dependency",
        action="append",
        default=[],
        metavar="TEXT",
        help="a dependency (repeatable)",
    )
    generate.add_argument("--build-commit", help="source commit of the build")
    generate.add_argument("--build-date", help="time of the build")
    generate.add_argument(
        "--compiler-version", help="compiler or toolchain of the build"
    )
    generate.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="GLOB",
        help="skip paths or names matching GLOB, such as __pycache__ (repeatable)",
    )
    generate.add_argument(
        "--threads", type=positive_int, help="hashing threads (default: CPU count)"
    )
    generate.add_argument(
        "--sign-files",
        action="store_true",
        help="fill every file_signature with a detached CMS signature (needs --key and --cert)",
    )
    generate.add_argument("--key", help="signer private key for --sign-files")
    generate.add_argument(
        "--cert", help="signer certificate (and intermediates) for --sign-files"
    )
    generate.add_argument("--json", action="store_true", help="print a summary as JSON")
    generate.set_defaults(handler=_run_generate)


def _run_generate(arguments: argparse.Namespace) -> int:
    release_dir = Path(arguments.release_dir)
    output = Path(arguments.output)
    _reject_inside(output, release_dir, "output")
    _check_output_file(output)
    if arguments.sign_files and not (arguments.key and arguments.cert):
        raise InputError("--sign-files needs --key and --cert")

    info = _release_info(arguments)
    with progress_bar(0, "hashing") as bar:
        manifest = build_manifest(
            release_dir, info, arguments.exclude, arguments.threads, bar.update
        )
    if arguments.sign_files:
        manifest = sign_files(manifest, arguments.key, arguments.cert)

    body = manifest.canonical()
    atomic_write_bytes(output, body)
    digest = sha256_hex(body)
    emit(
        {
            "version": manifest.version,
            "output": str(output),
            "manifest_hash": digest,
            "files": len(manifest.files),
            "total_size": manifest.total_size,
        },
        f"wrote {output}: version {manifest.version}, {len(manifest.files)} files, "
        f"{format_bytes(manifest.total_size)}, manifest sha256 {digest}",
        arguments.json,
    )
    return 0


def _release_info(arguments: argparse.Namespace) -> ReleaseInfo:
    """Collect the release facts given as options of ``relman generate``."""
    notes = arguments.release_notes
    if arguments.release_notes_file:
        notes = read_file(arguments.release_notes_file, "release notes").decode("utf-8")
    build = {
        key: value
        for key, value in (
            ("build_commit", arguments.build_commit),
            ("build_date", arguments.build_date),
            ("compiler_version", arguments.compiler_version),
        )
        if value is not None
    }
    release_date = None
    if arguments.release_date:
        release_date = parse_release_date(arguments.release_date)
    return ReleaseInfo(
        version=arguments.version,
        tag_name=arguments.tag_name,
        release_notes=notes,
        release_date=release_date,
        is_critical=arguments.critical,
        build=build,
        dependencies=arguments.dependency,
        min_upgrade_from=arguments.min_upgrade_from,
    )


def _is_inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True


def _reject_inside(path: Path, release_dir: Path, what: str) -> None:
    """Raise InputError if ``path`` is ``release_dir`` or lies inside it."""
    if _is_inside(path, release_dir):
        raise InputError(
            f"{what} {str(path)!r} lies inside the release folder {str(release_dir)!r}; "
            "choose a path outside it, so it does not become part of the release"
        )


def _reject_private_inside(path: Path, repository: Path) -> None:
    """Raise InputError if ``path`` lies in the repository folder, which may be served."""
    if _is_inside(path, repository):
        raise InputError(
            f"audit log {str(path)!r} lies inside the repository {str(repository)!r}, "
            "which mirrors and web servers may serve; keep it outside"
        )


def _check_output_file(output: Path) -> None:
    """Raise InputError unless ``output`` can be written as a file."""
    if output.is_dir():
        raise InputError(f"output {str(output)!r} is a folder; name a file")
    if not output.parent.is_dir():
        raise InputError(
            f"folder {str(output.parent)!r} of output {str(output)!r} does not exist; create it first"
        )


# sign


def _register_sign(subcommands: argparse._SubParsersAction) -> None:
    sign = subcommands.add_parser(
        "sign",
        help="sign a manifest (detached CMS, DER), optionally with a timestamp",
        description=(
            "Write FILE.sig: a detached DER CMS SignedData over the manifest bytes, "
            "with signed attributes and the signer certificate included. Further "
            "certificates in CERT (intermediates) are included too. With --tsa-url, "
            "also write FILE.tsr: an RFC 3161 timestamp over the signature value."
        ),
    )
    sign.add_argument(
        "--manifest", required=True, metavar="FILE", help="manifest to sign"
    )
    sign.add_argument(
        "--key", required=True, help="signer private key (PEM or DER, unencrypted)"
    )
    sign.add_argument(
        "--cert", required=True, help="signer certificate, then any intermediates (PEM)"
    )
    sign.add_argument(
        "--output", metavar="FILE", help="signature file (default: FILE.sig)"
    )
    sign.add_argument(
        "--digest",
        choices=DIGESTS,
        default="sha256",
        help="digest algorithm (default: sha256)",
    )
    sign.add_argument(
        "--rsa-pss", action="store_true", help="sign with RSASSA-PSS (RSA keys only)"
    )
    sign.add_argument(
        "--tsa-url",
        metavar="URL",
        help="RFC 3161 timestamp authority to ask for a token",
    )
    sign.add_argument(
        "--tsa-roots",
        metavar="PEM",
        help="verify the token's TSA chain against these roots before writing it",
    )
    sign.add_argument("--json", action="store_true", help="print the result as JSON")
    sign.set_defaults(handler=_run_sign)


def _run_sign(arguments: argparse.Namespace) -> int:
    body, _ = read_manifest(arguments.manifest)
    output = arguments.output or arguments.manifest + ".sig"
    _check_output_file(Path(output))
    signature = sign_detached(
        body, arguments.key, arguments.cert, arguments.digest, arguments.rsa_pss
    )
    result = {"signature": output, "manifest_hash": sha256_hex(body), "timestamp": None}
    token = None
    if arguments.tsa_url:
        value = parse_signature(signature).signature_value
        token = request_timestamp(value, arguments.tsa_url)
        if arguments.tsa_roots:
            policy = TrustPolicy(
                roots=(), tsa_roots=tuple(load_certificates(arguments.tsa_roots))
            )
            stamp = verify_timestamp(token, value, policy)
            result["timestamp_time"] = stamp.time.strftime("%Y-%m-%dT%H:%M:%SZ")
        result["timestamp"] = output.removesuffix(".sig") + ".tsr"
    atomic_write_bytes(output, signature)
    stale = Path(output.removesuffix(".sig") + ".tsr")
    if token is not None:
        atomic_write_bytes(result["timestamp"], token)
    elif stale.is_file():
        # A timestamp beside the file belongs to the signature just replaced.
        stale.unlink()
        logger.warning("removed %s: it timestamped the previous signature", stale)
    text = f"wrote {output}" + (f" and {result['timestamp']}" if token else "")
    emit(result, text, arguments.json)
    return 0


# verify


def _register_verify(subcommands: argparse._SubParsersAction) -> None:
    verify = subcommands.add_parser(
        "verify",
        help="verify a manifest's signature, timestamp and certificate chain",
        description=(
            "Check the detached signature FILE.sig over FILE, its timestamp (FILE.tsr "
            "or a token inside the signature) and the signer's chain under the trust "
            "policy. Exit code 3 on any verification failure."
        ),
    )
    verify.add_argument(
        "--manifest", required=True, metavar="FILE", help="manifest to verify"
    )
    verify.add_argument(
        "--signature", metavar="FILE", help="signature file (default: FILE.sig)"
    )
    verify.add_argument(
        "--timestamp",
        metavar="FILE",
        help="timestamp file (default: FILE.tsr if present)",
    )
    add_trust_options(verify, required=True)
    add_audit_option(verify)
    verify.add_argument("--json", action="store_true", help="print the result as JSON")
    verify.set_defaults(handler=_run_verify)


def _run_verify(arguments: argparse.Namespace) -> int:
    body, manifest = read_manifest(arguments.manifest)
    signature_path = arguments.signature or arguments.manifest + ".sig"
    signature = read_file(signature_path, "signature")
    timestamp = timestamp_from(arguments.timestamp, signature_path)
    policy = policy_from(arguments)
    result = verify_signature(
        body, signature, policy, timestamp, audit=AuditFile(arguments.audit_log)
    )
    stamp = result.timestamp
    emit(
        {
            "verified": True,
            "version": manifest.version,
            "manifest_hash": sha256_hex(body),
            "signer": result.subject,
            "signer_fingerprint": result.fingerprint,
            "timestamp": stamp.time.strftime("%Y-%m-%dT%H:%M:%SZ") if stamp else None,
            "notes": list(result.notes),
        },
        f"verified: version {manifest.version} signed by {result.subject} "
        f"(sha256 fingerprint {result.fingerprint})"
        + (
            f", timestamped {stamp.time:%Y-%m-%d %H:%M:%S} UTC by {stamp.authority}"
            if stamp
            else ""
        ),
        arguments.json,
    )
    return 0


# publish


def _register_publish(subcommands: argparse._SubParsersAction) -> None:
    publish = subcommands.add_parser(
        "publish",
        help="add a signed release to a repository folder",
        description=(
            "Verify the manifest's signature, copy the release's files into the "
            "repository's blob store (hashed while written), then make the manifest "
            "visible. Publishing the same version with the same manifest changes "
            "nothing; with another manifest it is rejected."
        ),
    )
    publish.add_argument(
        "--repo",
        required=True,
        metavar="REPO",
        help="repository folder (created if missing)",
    )
    publish.add_argument(
        "--manifest", required=True, metavar="FILE", help="signed manifest"
    )
    publish.add_argument(
        "--signature", metavar="FILE", help="signature file (default: FILE.sig)"
    )
    publish.add_argument(
        "--timestamp",
        metavar="FILE",
        help="timestamp file (default: FILE.tsr if present)",
    )
    publish.add_argument(
        "--release-dir",
        required=True,
        metavar="DIR",
        help="folder the manifest was generated from",
    )
    add_trust_options(publish, required=False)
    add_audit_option(publish)
    publish.add_argument("--json", action="store_true", help="print the result as JSON")
    publish.set_defaults(handler=_run_publish)


def _run_publish(arguments: argparse.Namespace) -> int:
    _reject_inside(Path(arguments.repo), Path(arguments.release_dir), "repository")
    if arguments.audit_log:
        _reject_private_inside(Path(arguments.audit_log), Path(arguments.repo))
    body, manifest = read_manifest(arguments.manifest)
    signature_path = arguments.signature or arguments.manifest + ".sig"
    signature = read_file(signature_path, "signature")
    timestamp = timestamp_from(arguments.timestamp, signature_path)
    if not (arguments.trust or arguments.trust_policy) and os.environ.get(
        "RELMAN_TRUST"
    ):
        arguments.trust = os.environ["RELMAN_TRUST"]
    policy = policy_from(arguments)
    if policy is None:
        logger.warning(
            "no --trust or --trust-policy given: the signer's certificate chain is not checked"
        )
    with progress_bar(manifest.total_size, f"publishing {manifest.version}") as bar:
        result = publish_release(
            arguments.repo,
            body,
            signature,
            arguments.release_dir,
            policy,
            timestamp,
            progress=bar.update,
            audit=AuditFile(arguments.audit_log),
        )
    state = "published" if result.created else "already published, nothing changed"
    emit(
        {
            "version": result.version,
            "manifest_hash": result.manifest_hash,
            "created": result.created,
            "bytes_copied": result.bytes_copied,
            "signer": result.signer.subject,
        },
        f"{state}: version {result.version} in {arguments.repo} "
        f"({format_bytes(result.bytes_copied)} of new blobs)",
        arguments.json,
    )
    return 0


# reindex


def _register_reindex(subcommands: argparse._SubParsersAction) -> None:
    reindex = subcommands.add_parser(
        "reindex",
        help="rebuild a repository's index.sqlite from its files",
        description="Rebuild index.sqlite from manifests/; the files are the truth.",
    )
    reindex.add_argument(
        "--repo", required=True, metavar="REPO", help="repository folder"
    )
    reindex.set_defaults(handler=_run_reindex)


def _run_reindex(arguments: argparse.Namespace) -> int:
    count = Repository.open(arguments.repo).reindex()
    print(f"indexed {count} releases in {arguments.repo}")
    return 0
