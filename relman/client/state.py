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
        """Record a flip and return its rollback id, which names the release it replaced."""
        rollback_id = uuid.uuid4().hex
        with self.db.conn:
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
