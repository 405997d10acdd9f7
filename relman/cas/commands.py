"""Subcommands that work on files and repositories: pki, generate, sign, verify, publish, reindex."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from relman.cas.canonical import sha256_hex
from relman.cas.cms import sign_detached, verify_detached
from relman.cas.console import emit, format_bytes, progress_bar
from relman.cas.errors import InputError
from relman.cas.fsutil import atomic_write_bytes
from relman.cas.generate import ReleaseInfo, build_manifest, parse_release_date
from relman.cas.manifest import parse_manifest_bytes
from relman.cas.pki import init_pki, load_certificates
from relman.cas.publish import publish_release
from relman.cas.repository import Repository

logger = logging.getLogger(__name__)


def register(subcommands: argparse._SubParsersAction) -> None:
    _register_pki(subcommands)
    _register_generate(subcommands)
    _register_sign(subcommands)
    _register_verify(subcommands)
    _register_publish(subcommands)
    _register_reindex(subcommands)


def read_file(path: str, what: str) -> bytes:
    """Read a whole file, raising InputError that names ``what`` and the path."""
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise InputError(f"cannot read {what} {path!r}: {error.strerror}") from error


def load_trust(path: str | None) -> list | None:
    return load_certificates(path) if path else None


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
        help="ISO 8601 date-time (default: SOURCE_DATE_EPOCH, else the newest file time)",
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
        "--threads", type=int, help="hashing threads (default: CPU count)"
    )
    generate.add_argument("--json", action="store_true", help="print a summary as JSON")
    generate.set_defaults(handler=_run_generate)


def _run_generate(arguments: argparse.Namespace) -> int:
    release_dir = Path(arguments.release_dir)
    output = Path(arguments.output)
    _reject_output_inside(output, release_dir)
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
    info = ReleaseInfo(
        version=arguments.version,
        tag_name=arguments.tag_name,
        release_notes=notes,
        release_date=parse_release_date(arguments.release_date)
        if arguments.release_date
        else None,
        is_critical=arguments.critical,
        build=build,
        dependencies=arguments.dependency,
        min_upgrade_from=arguments.min_upgrade_from,
    )
    with progress_bar(0, "hashing") as bar:
        manifest = build_manifest(
            release_dir, info, arguments.exclude, arguments.threads, bar.update
        )
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


def _reject_output_inside(output: Path, release_dir: Path) -> None:
    try:
        output.resolve().relative_to(release_dir.resolve())
    except ValueError:
        return
    raise InputError(
        f"output {str(output)!r} lies inside the release folder {str(release_dir)!r}; "
        "write the manifest elsewhere so it does not become part of the release"
    )


# sign


def _register_sign(subcommands: argparse._SubParsersAction) -> None:
    sign = subcommands.add_parser(
        "sign",
        help="sign a manifest (detached CMS, DER)",
        description=(
            "Write FILE.sig: a detached DER CMS SignedData over the manifest bytes, "
            "SHA-256, with signed attributes and the signer certificate included. "
            "Further certificates in CERT (intermediates) are included too."
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
    sign.add_argument("--json", action="store_true", help="print the result as JSON")
    sign.set_defaults(handler=_run_sign)


def _run_sign(arguments: argparse.Namespace) -> int:
    body = read_file(arguments.manifest, "manifest")
    parse_manifest_bytes(body)
    signature = sign_detached(body, arguments.key, arguments.cert)
    output = arguments.output or arguments.manifest + ".sig"
    atomic_write_bytes(output, signature)
    emit(
        {"signature": output, "manifest_hash": sha256_hex(body)},
        f"wrote {output}",
        arguments.json,
    )
    return 0


# verify


def _register_verify(subcommands: argparse._SubParsersAction) -> None:
    verify = subcommands.add_parser(
        "verify",
        help="verify a manifest's signature and certificate chain",
        description=(
            "Check the detached signature FILE.sig over FILE and the signer's chain "
            "to the trusted roots. Exit code 3 on any verification failure."
        ),
    )
    verify.add_argument(
        "--manifest", required=True, metavar="FILE", help="manifest to verify"
    )
    verify.add_argument(
        "--signature", metavar="FILE", help="signature file (default: FILE.sig)"
    )
    verify.add_argument(
        "--trust",
        required=True,
        metavar="CA.pem",
        help="trusted root certificates (PEM)",
    )
    verify.add_argument("--json", action="store_true", help="print the result as JSON")
    verify.set_defaults(handler=_run_verify)


def _run_verify(arguments: argparse.Namespace) -> int:
    body = read_file(arguments.manifest, "manifest")
    signature = read_file(
        arguments.signature or arguments.manifest + ".sig", "signature"
    )
    trust = load_certificates(arguments.trust)
    signer = verify_detached(body, signature, trust)
    manifest = parse_manifest_bytes(body)
    emit(
        {
            "verified": True,
            "version": manifest.version,
            "manifest_hash": sha256_hex(body),
            "signer": signer.subject,
            "signer_fingerprint": signer.fingerprint,
        },
        f"verified: version {manifest.version} signed by {signer.subject} "
        f"(sha256 fingerprint {signer.fingerprint})",
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
        "--release-dir",
        required=True,
        metavar="DIR",
        help="folder the manifest was generated from",
    )
    publish.add_argument(
        "--trust",
        metavar="CA.pem",
        default=os.environ.get("RELMAN_TRUST"),
        help="trusted roots for the signer chain (default: $RELMAN_TRUST; "
        "without either, only the signature itself is checked)",
    )
    publish.add_argument("--json", action="store_true", help="print the result as JSON")
    publish.set_defaults(handler=_run_publish)


def _run_publish(arguments: argparse.Namespace) -> int:
    body = read_file(arguments.manifest, "manifest")
    signature = read_file(
        arguments.signature or arguments.manifest + ".sig", "signature"
    )
    trust = load_trust(arguments.trust)
    if trust is None:
        logger.warning(
            "no --trust given: the signer's certificate chain is not checked"
        )
    manifest = parse_manifest_bytes(body)
    with progress_bar(manifest.total_size, f"publishing {manifest.version}") as bar:
        result = publish_release(
            arguments.repo,
            body,
            signature,
            arguments.release_dir,
            trust,
            progress=bar.update,
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
