"""The folders of a node and the lock that serialises changes to them.

<root>/store/               the local repository (same layout as a mirror's)
<root>/store/modes/<mode>/  read-only copies of blobs for deployed modes other than 0444
<root>/releases/<version>/  deployed trees, files hard-linked from the store
<root>/current  -> releases/<version>
<root>/previous -> releases/<version>
<root>/state.sqlite         verified manifests, deployments, audit log
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from relman.cas.errors import InputError
from relman.cas.repository import Repository
from relman.client.state import NodeState

logger = logging.getLogger(__name__)

# Folders that relman builds under releases/ start with a dot, and a version
# never does, so a half-built folder is never mistaken for a release.
STAGING_MARK = ".staging-"


class Node:
    """One node's root folder."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.releases = self.root / "releases"
        self.current = self.root / "current"
        self.previous = self.root / "previous"

    @classmethod
    def open(cls, root: str | Path, create: bool = False) -> Node:
        node = cls(root)
        node._check_root()
        if create:
            node.releases.mkdir(parents=True, exist_ok=True)
            Repository.create(node.root / "store")
        elif not (node.root / "store" / "config.json").is_file():
            raise InputError(
                f"{str(node.root)!r} is not a relman node root: store/ is missing; "
                f"run `relman pull --mirror URL --root {node.root} --trust CA.pem` first"
            )
        return node

    def _check_root(self) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise InputError(
                f"node root {str(self.root)!r} is not a folder; pass a folder for --root"
            )

    @property
    def store(self) -> Repository:
        return Repository(self.root / "store")

    def state(self) -> NodeState:
        return NodeState(self.root / "state.sqlite")

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the node's exclusive lock; a second writer waits for the first."""
        self._check_root()
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+b") as stream:
            fcntl.flock(stream.fileno(), fcntl.LOCK_EX)
            try:
                self.clean_up()
                yield
            finally:
                fcntl.flock(stream.fileno(), fcntl.LOCK_UN)

    def clean_up(self) -> None:
        """Remove what an interrupted apply or flip left half-built.

        Partial downloads in store/tmp/partial are kept so a pull can resume.
        """
        if self.releases.is_dir():
            for name in os.listdir(self.releases):
                if name.startswith("."):
                    logger.info("removing half-built release folder %s", name)
                    remove_tree(self.releases / name)
        for name in os.listdir(self.root):
            if name.startswith((".current.", ".previous.")):
                (self.root / name).unlink(missing_ok=True)

    def link_version(self, link: Path) -> str | None:
        """Return the version a ``current`` or ``previous`` symlink points at."""
        try:
            target = os.readlink(link)
        except FileNotFoundError:
            return None
        except OSError as error:
            raise InputError(
                f"{str(link)!r} is not a symlink, but relman manages it as one; move it "
                "away, then apply a release again"
            ) from error
        return Path(target).name

    def deployed_versions(self) -> list[str]:
        if not self.releases.is_dir():
            return []
        return sorted(
            name for name in os.listdir(self.releases) if not name.startswith(".")
        )


def remove_tree(path: Path) -> None:
    """Delete a deployed or half-built tree.

    Deployed files are read-only, but unlinking needs write access to their
    folder only, and relman creates folders with mode 0755.
    """
    shutil.rmtree(path)
