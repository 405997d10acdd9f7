"""Node subcommands: pull, apply, rollback, status."""

from __future__ import annotations

import argparse
from pathlib import Path

import uvloop

from relman.cas.cli_options import add_trust_options, policy_from, positive_int
from relman.cas.console import emit, format_bytes, progress_bar
from relman.client.deploy import apply_release, rollback_release
from relman.client.node import Node
from relman.client.pull import DEFAULT_CONCURRENCY, pull_release


def register(subcommands: argparse._SubParsersAction) -> None:
    _register_pull(subcommands)
    _register_apply(subcommands)
    _register_rollback(subcommands)
    _register_status(subcommands)


def _add_root(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--root",
        required=True,
        metavar="ROOT",
        help="node folder holding store/, releases/, current and previous",
    )


def _register_pull(subcommands: argparse._SubParsersAction) -> None:
    pull = subcommands.add_parser(
        "pull",
        help="fetch a verified release from a mirror into the node's store",
        description=(
            "Fetch the manifest of VERSION (default: the latest), verify its signature "
            "and chain before any blob is fetched, then download only the blobs "
            "missing from ROOT/store. An interrupted download resumes where it stopped."
        ),
    )
    pull.add_argument(
        "--mirror",
        required=True,
        metavar="URL",
        help="mirror base URL, such as http://127.0.0.1:8080",
    )
    _add_root(pull)
    add_trust_options(pull, required=True)
    pull.add_argument("--version", help="version to pull (default: the latest)")
    pull.add_argument(
        "--concurrency",
        type=positive_int,
        default=DEFAULT_CONCURRENCY,
        metavar="N",
        help=f"parallel blob downloads (default: {DEFAULT_CONCURRENCY})",
    )
    pull.add_argument("--json", action="store_true", help="print the result as JSON")
    pull.set_defaults(handler=_run_pull)


def _run_pull(arguments: argparse.Namespace) -> int:
    result = uvloop.run(
        pull_release(
            arguments.mirror,
            arguments.root,
            policy_from(arguments),
            arguments.version,
            arguments.concurrency,
            progress_factory=lambda total, label: progress_bar(total, label),
        )
    )
    stats = result.stats
    emit(
        {
            "version": result.version,
            "manifest_hash": result.manifest_hash,
            "release_size": result.release_size,
            "blobs_fetched": stats.blobs_fetched,
            "bytes_received": stats.bytes_received,
            "resumed": stats.resumed,
            "retries": stats.retries,
            "seconds": round(result.seconds, 3),
        },
        f"pulled {result.version}: fetched {stats.blobs_fetched} "
        f"{'blob' if stats.blobs_fetched == 1 else 'blobs'}, "
        f"{format_bytes(stats.bytes_received)} of a {format_bytes(result.release_size)} "
        f"release, in {result.seconds:.2f} s",
        arguments.json,
    )
    return 0


def _register_apply(subcommands: argparse._SubParsersAction) -> None:
    apply = subcommands.add_parser(
        "apply",
        help="deploy a pulled release and make it current",
        description=(
            "Build ROOT/releases/VERSION from hard links to the store (read-only files, "
            "modes from the manifest), then atomically point ROOT/current at it and "
            "ROOT/previous at the release it replaced."
        ),
    )
    _add_root(apply)
    apply.add_argument(
        "--version", required=True, help="version to deploy (must be pulled)"
    )
    # Without either option, apply relies on the verification recorded by pull.
    add_trust_options(apply, required=False)
    apply.add_argument(
        "--allow-downgrade",
        action="store_true",
        help="allow a version lower than the current one",
    )
    apply.add_argument("--json", action="store_true", help="print the result as JSON")
    apply.set_defaults(handler=_run_apply)


def _run_apply(arguments: argparse.Namespace) -> int:
    result = apply_release(
        arguments.root,
        arguments.version,
        policy_from(arguments),
        arguments.allow_downgrade,
    )
    _emit_deploy(result, "applied", arguments.json)
    return 0


def _register_rollback(subcommands: argparse._SubParsersAction) -> None:
    rollback = subcommands.add_parser(
        "rollback",
        help="make the previous release current again",
        description=(
            "Point ROOT/current back at ROOT/previous (or at the release that the apply "
            "with --id replaced) and ROOT/previous at the release that was current."
        ),
    )
    _add_root(rollback)
    rollback.add_argument(
        "--id", dest="rollback_id", help="rollback id printed by apply or status"
    )
    rollback.add_argument(
        "--json", action="store_true", help="print the result as JSON"
    )
    rollback.set_defaults(handler=_run_rollback)


def _run_rollback(arguments: argparse.Namespace) -> int:
    result = rollback_release(arguments.root, arguments.rollback_id)
    _emit_deploy(result, "rolled back to", arguments.json)
    return 0


def _emit_deploy(result, verb: str, as_json: bool) -> None:  # noqa: ANN001
    emit(
        {
            "version": result.version,
            "previous": result.previous,
            "rollback_id": result.rollback_id,
            "files": result.files,
            "reused_tree": result.reused_tree,
            "seconds": round(result.seconds, 3),
        },
        f"{verb} {result.version} (previous: {result.previous or 'none'}, "
        f"rollback id {result.rollback_id}, {result.files} files, {result.seconds:.2f} s)",
        as_json,
    )


def _register_status(subcommands: argparse._SubParsersAction) -> None:
    status = subcommands.add_parser(
        "status",
        help="show the current and previous release of a node",
        description="Show current, previous, the deployed releases and the pulled versions.",
    )
    _add_root(status)
    status.add_argument("--json", action="store_true", help="print the result as JSON")
    status.set_defaults(handler=_run_status)


def _run_status(arguments: argparse.Namespace) -> int:
    node = Node.open(arguments.root)
    with node.state() as state:
        deployments = state.deployments(limit=10)
        recent = state.recent_audit(limit=10)
    result = {
        "root": str(Path(arguments.root)),
        "current": node.link_version(node.current),
        "previous": node.link_version(node.previous),
        "releases": node.deployed_versions(),
        "pulled": node.store.versions(),
        "deployments": deployments,
        "audit": recent,
    }
    lines = [
        f"current:  {result['current'] or 'none'}",
        f"previous: {result['previous'] or 'none'}",
        f"releases: {', '.join(result['releases']) or 'none'}",
        f"pulled:   {', '.join(result['pulled']) or 'none'}",
    ]
    if deployments:
        lines.append("recent deployments (newest first):")
        for row in deployments:
            lines.append(
                f"  {row['at']}  {row['action']:<8} {row['version']:<12} "
                f"from {row['previous_version'] or 'none':<12} rollback id {row['rollback_id']}"
            )
    if recent:
        lines.append("recent audit entries (newest first):")
        for row in recent:
            subject = row.get("action") or row.get("object")
            reason = row.get("reason") or row.get("detail") or ""
            lines.append(f"  {row['at']}  {subject:<8} {row['outcome']:<9} {reason}")
    emit(result, "\n".join(lines), arguments.json)
    return 0
