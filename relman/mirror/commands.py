"""The ``serve`` subcommand: run the HTTP mirror of a repository folder."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

import uvloop

from relman.mirror.app import mirror_url, open_repository, start_mirror, stop_mirror

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def register(subcommands: argparse._SubParsersAction) -> None:
    """Add the ``serve`` subcommand to the relman parser."""
    serve = subcommands.add_parser(
        "serve",
        help="serve a repository folder over HTTP",
        description=(
            "Serve the public files of REPO (config.json, index.json, manifests "
            "and blobs, with ETags and byte ranges) and the JSON update API under "
            "/api/updates/manifests. index.sqlite, tmp/ and .lock are never "
            "served. Versions published while the mirror runs appear without a "
            "restart. Stops on SIGINT or SIGTERM."
        ),
    )
    serve.add_argument(
        "--repo", required=True, metavar="REPO", help="repository folder to serve"
    )
    serve.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help=f"address to listen on (default: {DEFAULT_HOST})",
    )
    serve.add_argument(
        "--port",
        type=_port_number,
        default=DEFAULT_PORT,
        help=f"TCP port to listen on, 0 for a free port (default: {DEFAULT_PORT})",
    )
    # A service logs its start, stop and every request by default.
    serve.set_defaults(handler=_run_serve, log_level=logging.INFO)


def _port_number(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(
            f"invalid port {text!r}: expected a number from 0 to 65535"
        )
    return port


def _run_serve(arguments: argparse.Namespace) -> int:
    # Check the folder before starting the event loop, so an invalid REPO
    # fails with the InputError that names it.
    open_repository(arguments.repo)
    uvloop.run(_serve(arguments.repo, arguments.host, arguments.port))
    return 0


async def _serve(repository_root: str, host: str, port: int) -> None:
    runner, bound_port = await start_mirror(repository_root, host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for number in _STOP_SIGNALS:
        loop.add_signal_handler(number, _request_stop, stop, number)

    try:
        # Tests and scripts read the port from this line.
        url = mirror_url(host, bound_port)
        print(f"serving {repository_root} on {url}", flush=True)
        await stop.wait()
    finally:
        for number in _STOP_SIGNALS:
            loop.remove_signal_handler(number)
        await stop_mirror(runner)


def _request_stop(stop: asyncio.Event, number: int) -> None:
    logger.info("received %s, stopping the mirror", signal.Signals(number).name)
    stop.set()
