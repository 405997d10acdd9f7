"""The node's ``state.sqlite``: verified manifests, deployments and an audit log."""

from __future__ import annotations

import json
import sqlite3
import uuid
from pathlib import Path
from typing import Any

import sqlite_utils

from relman.cas.index import utc_now


class NodeState:
    """Read and write ``state.sqlite``; one connection per instance."""

    def __init__(self, path: str | Path):
        connection = sqlite3.connect(str(path), timeout=30)
        connection.execute("PRAGMA journal_mode=WAL")
        self.db = sqlite_utils.Database(connection)
        self._create_tables()

    def close(self) -> None:
        self.db.conn.close()

    def __enter__(self) -> NodeState:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _create_tables(self) -> None:
        self.db["verified_manifests"].create(
            {
                "version": str,
                "manifest_hash": str,
                "signer_subject": str,
                "signer_fingerprint": str,
                "mirror": str,
                "verified_at": str,
            },
            pk="version",
            if_not_exists=True,
        )
        self.db["deployments"].create(
            {
                "rollback_id": str,
                "action": str,
                "version": str,
                "previous_version": str,
                "manifest_hash": str,
                "at": str,
            },
            pk="rollback_id",
            if_not_exists=True,
        )
        self.db["security_audit"].create(
            {
                "id": int,
                "at": str,
                "object": str,
                "content_sha256": str,
                "outcome": str,
                "reason": str,
                "signer": str,
                "signer_fingerprint": str,
                "timestamp": str,
                "notes": str,
            },
            pk="id",
            if_not_exists=True,
        )
        self.db["pending_flip"].create(
            {
                "id": int,
                "action": str,
                "version": str,
                "previous_version": str,
                "manifest_hash": str,
                "at": str,
            },
            pk="id",
            if_not_exists=True,
        )
        self.db["audit_log"].create(
            {
                "id": int,
                "at": str,
                "action": str,
                "version": str,
                "outcome": str,
                "detail": str,
            },
            pk="id",
            if_not_exists=True,
        )

    def record_verified(
        self,
        version: str,
        manifest_hash: str,
        subject: str,
        fingerprint: str,
        mirror: str,
    ) -> None:
        with self.db.conn:
            self.db["verified_manifests"].upsert(
                {
                    "version": version,
                    "manifest_hash": manifest_hash,
                    "signer_subject": subject,
                    "signer_fingerprint": fingerprint,
                    "mirror": mirror,
                    "verified_at": utc_now(),
                },
                pk="version",
            )

    def verified_hash(self, version: str) -> str | None:
        rows = list(
            self.db.query(
                "select manifest_hash from verified_manifests where version = ?",
                [version],
            )
        )
        return rows[0]["manifest_hash"] if rows else None

    def record_deployment(
        self, action: str, version: str, previous: str | None, manifest_hash: str
    ) -> str:
        """Record a deployment and return its rollback id, which names the release it replaced."""
        with self.db.conn:
            return self._insert_deployment(action, version, previous, manifest_hash)

    def _insert_deployment(
        self, action: str, version: str, previous: str | None, manifest_hash: str
    ) -> str:
        rollback_id = uuid.uuid4().hex
        self.db["deployments"].insert(
            {
                "rollback_id": rollback_id,
                "action": action,
                "version": version,
                "previous_version": previous,
                "manifest_hash": manifest_hash,
                "at": utc_now(),
            }
        )
        return rollback_id

    def begin_flip(
        self, action: str, version: str, previous: str | None, manifest_hash: str
    ) -> None:
        """Write the journal entry of a flip before any link changes."""
        with self.db.conn:
            self.db["pending_flip"].delete_where()
            self.db["pending_flip"].insert(
                {
                    "id": 1,
                    "action": action,
                    "version": version,
                    "previous_version": previous,
                    "manifest_hash": manifest_hash,
                    "at": utc_now(),
                }
            )

    def pending_flip(self) -> dict[str, Any] | None:
        rows = list(self.db.query("select * from pending_flip where id = 1"))
        return rows[0] if rows else None

    def end_flip(self) -> str:
        """Record the journalled flip as a deployment and clear the journal; return its rollback id."""
        pending = self.pending_flip()
        if pending is None:
            raise RuntimeError("end_flip called without a pending flip")
        # One transaction: the deployment row appears exactly when the journal clears.
        with self.db.conn:
            rollback_id = self._insert_deployment(
                pending["action"],
                pending["version"],
                pending["previous_version"],
                pending["manifest_hash"],
            )
            self.db["pending_flip"].delete_where()
        return rollback_id

    def deployment(self, rollback_id: str) -> dict[str, Any] | None:
        rows = list(
            self.db.query(
                "select * from deployments where rollback_id = ?", [rollback_id]
            )
        )
        return rows[0] if rows else None

    def deployments(self, limit: int = 20) -> list[dict[str, Any]]:
        return list(
            self.db.query(
                "select * from deployments order by at desc, rowid desc limit ?",
                [limit],
            )
        )

    def recent_audit(self, limit: int = 10) -> list[dict[str, Any]]:
        """Return the newest entries of the audit log and the security audit log."""
        actions = list(
            self.db.query(
                "select at, action, version, outcome, detail from audit_log "
                "order by id desc limit ?",
                [limit],
            )
        )
        checks = list(
            self.db.query(
                "select at, object, outcome, reason, signer_fingerprint "
                "from security_audit order by id desc limit ?",
                [limit],
            )
        )
        return sorted(actions + checks, key=lambda row: row["at"], reverse=True)[:limit]

    def audit(
        self, action: str, version: str | None, outcome: str, **detail: Any
    ) -> None:
        with self.db.conn:
            self.db["audit_log"].insert(
                {
                    "at": utc_now(),
                    "action": action,
                    "version": version,
                    "outcome": outcome,
                    "detail": json.dumps(detail, sort_keys=True, default=str),
                }
            )

    def security_audit(self, record: dict[str, Any]) -> None:
        """Append one signature verification result, success or failure."""
        row = dict(record)
        row["notes"] = json.dumps(row.get("notes", []))
        with self.db.conn:
            self.db["security_audit"].insert(row)
