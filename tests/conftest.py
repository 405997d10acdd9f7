"""Settings for the whole test suite."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def audit_log_in_temporary_folder(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep the audit records of verify and publish out of the user's home folder.

    Subprocesses inherit the variable, so the real CLI writes there too.
    """
    os.environ["RELMAN_AUDIT_LOG"] = str(
        tmp_path_factory.mktemp("audit") / "audit.jsonl"
    )
