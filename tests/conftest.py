"""Settings for the whole test suite."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support import relman


@pytest.fixture(autouse=True, scope="session")
def audit_log_in_temporary_folder(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep the audit records of verify and publish out of the user's home folder.

    Subprocesses inherit the variable, so the real CLI writes there too.
    """
    os.environ["RELMAN_AUDIT_LOG"] = str(
        tmp_path_factory.mktemp("audit") / "audit.jsonl"
    )


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A development PKI made by ``relman pki init``, shared by the whole session."""
    folder = tmp_path_factory.mktemp("pki")
    relman("pki", "init", folder)
    return folder
