"""The security audit log of publishers and verifiers: one JSON object per line.

Nodes keep theirs in ``state.sqlite``. Everything else appends to the file
named by ``--audit-log``, else by $RELMAN_AUDIT_LOG, else
``$XDG_STATE_HOME/relman/audit.jsonl`` (default ``~/.local/state``). The log
lives outside any repository folder, because that folder may be served.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from relman.cas.errors import InputError


def default_audit_path() -> Path:
    configured = os.environ.get("RELMAN_AUDIT_LOG")
    if configured:
        return Path(configured)
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state"
    )
    return Path(state) / "relman" / "audit.jsonl"


class AuditFile:
    """Appends audit records to a JSON-lines file, creating it with mode 0600."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else default_audit_path()

    def __call__(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, sort_keys=True) + "\n"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(
                self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600
            )
            with os.fdopen(descriptor, "a", encoding="utf-8") as stream:
                stream.write(line)
        except OSError as error:
            # Every verification must be recorded, so a lost record fails the command.
            raise InputError(
                f"cannot append to audit log {str(self.path)!r}: {error.strerror}; fix "
                "its folder's permissions or pass --audit-log"
            ) from error
