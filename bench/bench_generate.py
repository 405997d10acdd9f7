"""Time `relman generate` against `sha256sum` hashing the same files.

Run by hand: .venv/bin/python bench/bench_generate.py [DIR]
DIR defaults to this Python's standard library without site-packages. The
peer is GNU coreutils sha256sum over the same file list, run with as many
parallel processes as relman has hashing threads. Each tool runs three times
after one warm-up run, so both read from the page cache; the best time counts.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

RUNS = 3
EXCLUDES = ("site-packages", "__pycache__")


def best_time(command: list[str], **options) -> float:
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, **options)
    times = []
    for _ in range(RUNS):
        started = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, **options)
        times.append(time.perf_counter() - started)
    return min(times)


def list_files(root: Path) -> list[str]:
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = sorted(name for name in subfolders if name not in EXCLUDES)
        files.extend(
            os.path.join(folder, name)
            for name in names
            if not os.path.islink(os.path.join(folder, name))
        )
    return files


def main() -> None:
    root = (
        Path(sys.argv[1])
        if len(sys.argv) > 1
        else Path(sysconfig.get_paths()["stdlib"])
    )
    threads = os.cpu_count() or 2
    files = list_files(root)
    size = sum(os.path.getsize(path) for path in files)
    with tempfile.TemporaryDirectory() as work:
        output = Path(work) / "manifest.json"
        excludes = (
            []
            if len(sys.argv) > 1
            else [arg for name in EXCLUDES for arg in ("--exclude", name)]
        )
        relman = best_time(
            [
                sys.executable,
                "-m",
                "relman",
                "generate",
                "--version",
                "1.0.0",
                "--release-dir",
                str(root),
                "--output",
                str(output),
                "--threads",
                str(threads),
                *excludes,
            ]
        )
        listing = Path(work) / "files"
        listing.write_bytes(b"\0".join(path.encode() for path in files))
        peer = best_time(
            ["sh", "-c", f"xargs -0 -P {threads} -n 200 sha256sum < {listing}"]
        )
    print(
        f"tree: {root}, {len(files)} files, {size / 2**20:.1f} MiB, {threads} threads"
    )
    print(
        f"relman generate: {relman:.3f} s ({size / 2**20 / relman:.0f} MiB/s, includes interpreter start)"
    )
    print(f"sha256sum:       {peer:.3f} s ({size / 2**20 / peer:.0f} MiB/s)")
    print(f"ratio relman/sha256sum: {relman / peer:.2f}")


if __name__ == "__main__":
    main()
