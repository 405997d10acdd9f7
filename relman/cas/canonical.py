"""Canonical JSON (RFC 8785, JSON Canonicalization Scheme).

The signed bytes of a manifest are its canonical form, so any party can
rebuild them from the parsed JSON and get the same SHA-256.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import rfc8785


def canonical_bytes(value: Any) -> bytes:
    """Serialise ``value`` as RFC 8785 canonical JSON (UTF-8, no trailing newline)."""
    return rfc8785.dumps(value)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def load_json_bytes(data: bytes, what: str) -> Any:
    """Parse UTF-8 JSON, raising ValueError that names ``what`` on failure."""
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise ValueError(f"{what} is not valid UTF-8 JSON: {error}") from error
