"""The SQLite index of a repository folder (``index.sqlite``).

The files are the truth; this is an index of them and can be rebuilt with
``relman reindex``. Its four tables follow the manifest database of the
original design:

- ``release_manifests``: one row per version (the version index);
- ``file_registry``: one row per (path, version);
- ``signature_cache``: verification results by manifest, signature and policy;
- ``download_cache``: where a node keeps a fetched file of a version.
"""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlite_utils

from relman.cas.manifest import Manifest
from relman.cas.versions import sort_versions

INDEX_NAME = "index.sqlite"


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class RepositoryIndex:
    """Read and write ``index.sqlite``; one connection per instance and thread."""

    def __init__(self, path: str | Path):
        connection = sqlite3.connect(str(path), timeout=30)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA foreign_keys=ON")
        self.db = sqlite_utils.Database(connection)
        self._create_tables()

    def close(self) -> None:
        self.db.conn.close()

    def __enter__(self) -> RepositoryIndex:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _create_tables(self) -> None:
        self.db["release_manifests"].create(
            {
                "version": str,
                "manifest_hash": str,
                "release_date": str,
                "is_critical": int,
                "file_count": int,
                "total_size": int,
                "manifest": str,
                "indexed_at": str,
            },
            pk="version",
            if_not_exists=True,
        )
        self.db["file_registry"].create(
            {
                "path": str,
                "version": str,
                "sha256_hash": str,
                "size_bytes": int,
                "type": str,
                "permissions": str,
                "platform": str,
                "architecture": str,
                "entry": str,
            },
            pk=("path", "version"),
            foreign_keys=[("version", "release_manifests", "version")],
            if_not_exists=True,
        )
        self.db["file_registry"].create_index(["sha256_hash"], if_not_exists=True)
        self.db["signature_cache"].create(
            {
                "manifest_hash": str,
                "signature_hash": str,
                "policy_hash": str,
                "verified": int,
                "signer_subject": str,
                "signer_fingerprint": str,
                "reason": str,
                "checked_at": str,
                "valid_until": str,
            },
            pk=("manifest_hash", "signature_hash", "policy_hash"),
            if_not_exists=True,
        )
        cache = self.db["signature_cache"]
        if "valid_until" not in cache.columns_dict:
            cache.add_column("valid_until", str)
        self.db["download_cache"].create(
            {"version": str, "path": str, "local_path": str, "fetched_at": str},
            pk=("version", "path"),
            if_not_exists=True,
        )

    def record_release(self, manifest: Manifest, manifest_hash: str) -> None:
        """Insert or replace a release and its files in one transaction."""
        with self.db.conn:
            self.db["file_registry"].delete_where("version = ?", [manifest.version])
            self.db["release_manifests"].upsert(
                {
                    "version": manifest.version,
                    "manifest_hash": manifest_hash,
                    "release_date": manifest.release_date,
                    "is_critical": int(manifest.is_critical),
                    "file_count": len(manifest.files),
                    "total_size": manifest.total_size,
                    "manifest": json.dumps(manifest.to_dict(), sort_keys=True),
                    "indexed_at": utc_now(),
                },
                pk="version",
            )
            self.db["file_registry"].insert_all(
                (
                    {
                        "path": entry.path,
                        "version": manifest.version,
                        "sha256_hash": entry.sha256_hash,
                        "size_bytes": entry.size_bytes,
                        "type": entry.type,
                        "permissions": entry.permissions,
                        "platform": entry.platform,
                        "architecture": entry.architecture,
                        "entry": json.dumps(entry.to_dict(), sort_keys=True),
                    }
                    for entry in manifest.files
                ),
                pk=("path", "version"),
                batch_size=1000,
            )

    def releases(self) -> list[dict[str, Any]]:
        """Return the release rows, lowest version first, without the manifest text."""
        rows = {
            row["version"]: row
            for row in self.db.query(
                "select version, manifest_hash, release_date, is_critical, "
                "file_count, total_size from release_manifests"
            )
        }
        ordered = [rows[version] for version in sort_versions(list(rows))]
        for row in ordered:
            row["is_critical"] = bool(row["is_critical"])
        return ordered

    def release(self, version: str) -> dict[str, Any] | None:
        rows = list(
            self.db.query(
                "select * from release_manifests where version = ?", [version]
            )
        )
        return rows[0] if rows else None

    def file(self, path: str, version: str) -> dict[str, Any] | None:
        rows = list(
            self.db.query(
                "select entry from file_registry where path = ? and version = ?",
                [path, version],
            )
        )
        return json.loads(rows[0]["entry"]) if rows else None

    def cached_verification(
        self, manifest_hash: str, signature_hash: str, policy_hash: str
    ) -> dict[str, Any] | None:
        """Return a cached verification result that is still within its validity."""
        rows = list(
            self.db.query(
                "select * from signature_cache where manifest_hash = ? and "
                "signature_hash = ? and policy_hash = ?",
                [manifest_hash, signature_hash, policy_hash],
            )
        )
        if not rows:
            return None
        row = rows[0]
        if row["valid_until"] and row["valid_until"] <= utc_now():
            return None
        row["verified"] = bool(row["verified"])
        return row

    def cache_verification(
        self,
        manifest_hash: str,
        signature_hash: str,
        policy_hash: str,
        verified: bool,
        subject: str,
        fingerprint: str,
        reason: str,
        valid_until: str | None,
    ) -> None:
        """Remember a verification result until ``valid_until`` (None: no limit)."""
        with self.db.conn:
            self.db["signature_cache"].upsert(
                {
                    "manifest_hash": manifest_hash,
                    "signature_hash": signature_hash,
                    "policy_hash": policy_hash,
                    "verified": int(verified),
                    "signer_subject": subject,
                    "signer_fingerprint": fingerprint,
                    "reason": reason,
                    "checked_at": utc_now(),
                    "valid_until": valid_until,
                },
                pk=("manifest_hash", "signature_hash", "policy_hash"),
            )

    def clear(self) -> None:
        with self.db.conn:
            self.db["file_registry"].delete_where()
            self.db["release_manifests"].delete_where()
