"""The ``relman`` command line: one parser, subcommands registered by each package.

Exit codes: 0 success, 1 error, 2 invalid usage, 3 verification failure,
130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import signal
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
        epilog=(
            "Exit codes: 0 success, 1 error, 2 invalid usage, 3 verification "
            "failure, 130 interrupted."
        ),
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
        print(
            f"relman {arguments.command}: interrupted{_INTERRUPT_HINTS.get(arguments.command, '')}",
            file=sys.stderr,
        )
        return 130
    except OSError as error:
        # A file-system failure that no check above foresaw: report it as a
        # one-line error rather than a traceback; -vv logs the traceback.
        logger.debug("unexpected OS error", exc_info=True)
        print(
            f"relman {arguments.command}: {_describe_os_error(error)}", file=sys.stderr
        )
        return 1
    return int(result or 0)


_INTERRUPT_HINTS = {
    "pull": "; partial downloads were kept, and the next pull resumes them"
}


def _describe_os_error(error: OSError) -> str:
    names = " -> ".join(
        repr(str(name)) for name in (error.filename, error.filename2) if name
    )
    reason = error.strerror or str(error)
    return f"{reason}: {names}" if names else reason


def run() -> None:
    """Console entry point: exit with main's code, and quietly on a closed stdout."""
    # Die quietly like other Unix tools when the reader of stdout goes away,
    # as in `relman status | head -1`.
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())
