"""Release version strings: Semantic Versioning 2.0.0, safe as path components."""

from __future__ import annotations

import re
from functools import total_ordering

from relman.cas.errors import InputError

# Semantic Versioning 2.0.0 grammar (semver.org), without a leading "v".
_SEMVER = re.compile(
    r"(?P<major>0|[1-9]\d*)\.(?P<minor>0|[1-9]\d*)\.(?P<patch>0|[1-9]\d*)"
    r"(?:-(?P<pre>(?:0|[1-9]\d*|\d*[A-Za-z-][0-9A-Za-z-]*)"
    r"(?:\.(?:0|[1-9]\d*|\d*[A-Za-z-][0-9A-Za-z-]*))*))?"
    r"(?:\+(?P<build>[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?"
)

MAX_VERSION_LENGTH = 128


@total_ordering
class Version:
    """A parsed semantic version, ordered by SemVer precedence."""

    def __init__(self, text: str) -> None:
        match = _SEMVER.fullmatch(text) if len(text) <= MAX_VERSION_LENGTH else None
        if match is None:
            raise InputError(
                f"invalid version {text!r}: expected a semantic version such as "
                "1.2.3 or 1.2.3-rc.1 (digits, letters, '.', '-', '+' only)"
            )
        self.text = text
        self.core = (int(match["major"]), int(match["minor"]), int(match["patch"]))
        pre = match["pre"]
        self.prerelease: tuple[str, ...] = tuple(pre.split(".")) if pre else ()

    def _key(self) -> tuple:
        # A release without a pre-release part ranks above its pre-releases.
        # Numeric identifiers rank below alphanumeric ones (SemVer item 11).
        pre = tuple(
            (0, int(part), "") if part.isdigit() else (1, 0, part)
            for part in self.prerelease
        )
        return (self.core, not self.prerelease, pre)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Version) and self._key() == other._key()

    def __lt__(self, other: Version) -> bool:
        return self._key() < other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return f"Version({self.text!r})"


def validate_version(text: str) -> str:
    """Return ``text`` unchanged if it is a valid version, else raise InputError."""
    Version(text)
    return text


def sort_versions(texts: list[str]) -> list[str]:
    """Sort version strings by SemVer precedence, lowest first."""
    return sorted(texts, key=Version)
