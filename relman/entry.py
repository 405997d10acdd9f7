"""The ``relman`` console script; it catches Ctrl-C while the modules load."""

import sys


def run() -> None:
    try:
        from relman.cli import run as run_cli
    except KeyboardInterrupt:
        sys.exit(130)
    run_cli()
