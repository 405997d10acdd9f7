"""The ``relman`` command line: one parser, subcommands registered by each package.

Exit codes: 0 success, 1 error, 2 invalid usage, 3 verification failure,
130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import sys

from relman import __version__, demo
from relman.cas import commands as cas_commands
from relman.cas.errors import RelmanError
from relman.client import commands as client_commands
from relman.mirror import commands as mirror_commands

logger = logging.getLogger("relman")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relman",
        description=(
            "Publish signed software releases and hot-reload them on the "
            "machines that run them."
        ),
        epilog="Exit codes: 0 success, 1 error, 2 invalid usage, 3 verification failure.",
    )
    parser.add_argument("--version", action="version", version=f"relman {__version__}")
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="log more (repeat for debug output)",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="log errors only")
    subcommands = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True
    )

    for module in (cas_commands, mirror_commands, client_commands, demo):
        module.register(subcommands)
    return parser


def configure_logging(
    verbose: int, quiet: bool, default: int = logging.WARNING
) -> None:
    """Send log records to stderr; services default to INFO, other commands to WARNING."""
    level = default
    if quiet:
        level = logging.ERROR
    elif verbose == 1:
        level = logging.INFO
    elif verbose > 1:
        level = logging.DEBUG
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    arguments = parser.parse_args(argv)
    configure_logging(
        arguments.verbose,
        arguments.quiet,
        getattr(arguments, "log_level", logging.WARNING),
    )
    try:
        result = arguments.handler(arguments)
    except RelmanError as error:
        print(f"relman {arguments.command}: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print(f"relman {arguments.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)
