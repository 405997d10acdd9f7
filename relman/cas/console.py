"""Terminal output shared by the subcommands: results, JSON, progress bars."""

from __future__ import annotations

import json
import sys
from typing import Any

from tqdm import tqdm


def emit(result: dict[str, Any], text: str, as_json: bool) -> None:
    """Print ``result`` as one JSON object, or ``text`` for a person."""
    if as_json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        print(text)


def progress_bar(total: int, description: str, unit: str = "B") -> tqdm:
    """Return a progress bar on stderr; it draws nothing unless stderr is a terminal."""
    return tqdm(
        total=total,
        desc=description,
        unit=unit,
        unit_scale=unit == "B",
        unit_divisor=1024 if unit == "B" else 1000,
        disable=not sys.stderr.isatty(),
        leave=False,
        file=sys.stderr,
    )


def format_bytes(count: int) -> str:
    """Format a byte count with a binary unit: 1536 -> '1.5 KiB'."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"
