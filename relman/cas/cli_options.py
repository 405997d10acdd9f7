"""Command-line options shared by the subcommands that verify signatures."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from relman.cas.errors import InputError
from relman.cas.policy import TrustPolicy, resolve_policy


def add_trust_options(parser: argparse.ArgumentParser, required: bool) -> None:
    """Add --trust and --trust-policy; with ``required``, one of them must be given."""
    group = parser.add_mutually_exclusive_group(required=required)
    group.add_argument(
        "--trust", metavar="CA.pem", help="trusted root certificates (PEM)"
    )
    group.add_argument(
        "--trust-policy",
        metavar="FILE",
        help="TOML trust policy: roots, intermediates, TSA roots, CRLs, OCSP, "
        "pinned signers (see docs/security.md)",
    )


def add_audit_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--audit-log",
        metavar="FILE",
        help="append verification results to FILE (default: $RELMAN_AUDIT_LOG, "
        "else $XDG_STATE_HOME/relman/audit.jsonl)",
    )


def policy_from(arguments: argparse.Namespace) -> TrustPolicy | None:
    return resolve_policy(arguments.trust, arguments.trust_policy)


def timestamp_from(explicit: str | None, signature_path: str) -> bytes | None:
    """Read ``--timestamp FILE``, else the ``.tsr`` beside the signed file if present."""
    if explicit:
        try:
            return Path(explicit).read_bytes()
        except OSError as error:
            raise InputError(
                f"cannot read timestamp {explicit!r}: {error.strerror}"
            ) from error
    beside = signature_path.removesuffix(".sig") + ".tsr"
    return Path(beside).read_bytes() if os.path.isfile(beside) else None


def positive_int(text: str) -> int:
    """Parse an argparse value that must be a whole number of 1 or more."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"invalid value {text!r}: expected a whole number of 1 or more"
        )
    return value
