"""The manifest model: paths, fields, symlink targets, versions and binary headers."""

from __future__ import annotations

import io
import json
import struct

import pytest

from relman.cas.binary import read_binary_info
from relman.cas.canonical import canonical_bytes
from relman.cas.errors import InputError, ManifestError
from relman.cas.manifest import (
    Manifest,
    ReleaseFile,
    check_symlinks,
    parse_manifest_bytes,
    validate_relative_path,
)
from relman.cas.versions import Version, sort_versions, validate_version

DIGEST = "ab" * 32


def entry(path: str, **changes) -> dict:
    data = ReleaseFile(path, "data", DIGEST, 1, "0644").to_dict()
    data.update(changes)
    return data


def body(*files: dict, **changes) -> dict:
    data = Manifest("1.0.0", ()).to_dict()
    data["files"] = list(files)
    data.update(changes)
    return data


@pytest.mark.parametrize(
    "path",
    [
        "../x",
        "/etc/x",
        "a/../../x",
        "a/./b",
        "a//b",
        "a/",
        "",
        ".",
        "..",
        "a\\b",
        "a\x00b",
        "a\nb",
        "a" * 256,
        "b/" + "ü" * 128,
    ],
)
def test_unsafe_path_rejected(path: str) -> None:
    with pytest.raises(ManifestError, match="unsafe path"):
        validate_relative_path(path)


@pytest.mark.parametrize(
    "path", ["a", "bin/server", "lib/libx.so.1", "ä/ü b", "..a/b..", ".hidden"]
)
def test_safe_path_accepted(path: str) -> None:
    assert validate_relative_path(path) == path


def test_from_dict_round_trip() -> None:
    data = body(entry("a"), entry("b/c", type="config", permissions="0600"))
    assert Manifest.from_dict(data).to_dict() == data


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (body(entry("a"), extra=1), "unknown keys \\['extra'\\]"),
        ({"version": "1.0.0"}, "missing keys"),
        (body(entry("a", size_bytes=True)), "size_bytes"),
        (body(entry("a", size_bytes=-1)), "invalid size_bytes"),
        (body(entry("a", sha256_hash="AB" * 32)), "invalid sha256_hash"),
        (body(entry("a", permissions="4755")), "invalid permissions"),
        (body(entry("a", permissions="0999")), "invalid permissions"),
        (body(entry("a", type="device")), "invalid type"),
        (body(entry("../a")), "unsafe path '../a'"),
        (body(entry("a"), entry("a")), "duplicate path 'a'"),
        (body(entry("lib"), entry("lib/x")), "lies below 'lib'"),
        (body(entry("a"), version="1.0"), "invalid version '1.0'"),
        (body(entry("a"), schema_version=2), "unsupported manifest schema_version 2"),
        (body(entry("a"), is_critical="yes"), "is_critical"),
        ([], "must be a JSON object"),
    ],
)
def test_from_dict_rejects(data: object, message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        Manifest.from_dict(data)


def test_parse_rejects_non_canonical_bytes() -> None:
    data = body(entry("a"))
    with pytest.raises(ManifestError, match="not in RFC 8785 canonical form"):
        parse_manifest_bytes(json.dumps(data, indent=1).encode())
    assert parse_manifest_bytes(canonical_bytes(data)).version == "1.0.0"


@pytest.mark.parametrize(
    ("links", "message"),
    [
        ({"x": "../y"}, "leaves the release tree"),
        ({"a/x": "../../y"}, "leaves the release tree"),
        ({"x": "/etc/passwd"}, "absolute"),
        ({"x": ""}, "empty"),
        ({"d": ".", "x": "d/../y"}, "leaves the release tree"),
        (
            {"a/b/c/up": "../../..", "s1": "a/b/c", "t1": "s1/up/.."},
            "leaves the release tree",
        ),
        ({"x": "x"}, "expands more than 40 symlinks"),
        ({"x": "a" * 5000}, "longer than 4095 bytes"),
        ({"a/b": "../c\n"}, "control characters"),
    ],
)
def test_check_symlinks_rejects(links: dict[str, str], message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        check_symlinks(links)


def test_check_symlinks_accepts_inside() -> None:
    check_symlinks(
        {"lib/a.so": "a.so.1", "bin/x": "../lib/a.so", "a/b/c": "../../d/./e", "d": "."}
    )


@pytest.mark.parametrize(
    "text", ["1.0", "v1.0.0", "01.0.0", "1.0.0-", "1.0.0/../x", "1.0.0 ", "", "x" * 200]
)
def test_invalid_versions(text: str) -> None:
    with pytest.raises(InputError, match="invalid version"):
        validate_version(text)


def test_version_precedence() -> None:
    versions = [
        "1.10.0",
        "1.9.0",
        "2.0.0",
        "2.0.0-rc.1",
        "2.0.0-rc.10",
        "2.0.0-rc.2",
        "2.0.0-alpha",
        "1.0.0+build.5",
    ]
    assert sort_versions(versions) == [
        "1.0.0+build.5",
        "1.9.0",
        "1.10.0",
        "2.0.0-alpha",
        "2.0.0-rc.1",
        "2.0.0-rc.2",
        "2.0.0-rc.10",
        "2.0.0",
    ]
    assert Version("1.0.0+a") == Version("1.0.0+b")


def pe_header(machine: int, characteristics: int) -> bytes:
    dos = bytearray(64)
    dos[0:2] = b"MZ"
    struct.pack_into("<I", dos, 0x3C, 64)
    coff = b"PE\x00\x00" + struct.pack(
        "<HHIIIHH", machine, 1, 0, 0, 0, 0, characteristics
    )
    return bytes(dos) + coff


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (pe_header(0x8664, 0x0022), ("windows", "x64", False)),
        (pe_header(0xAA64, 0x2022), ("windows", "arm64", True)),
        (
            b"\xcf\xfa\xed\xfe" + struct.pack("<iII", 0x0100000C, 0, 2) + bytes(48),
            ("macos", "arm64", False),
        ),
        (
            b"\xcf\xfa\xed\xfe" + struct.pack("<iII", 0x01000007, 3, 6) + bytes(48),
            ("macos", "x64", True),
        ),
        (
            b"\x7fELF\x02\x01\x01" + bytes(9) + struct.pack("<HH", 3, 0xB7) + bytes(44),
            ("linux", "arm64", True),
        ),
        (
            b"\x7fELF\x01\x01\x01" + bytes(9) + struct.pack("<HH", 2, 0x03) + bytes(44),
            ("linux", "x86", False),
        ),
    ],
)
def test_binary_headers(data: bytes, expected: tuple) -> None:
    info = read_binary_info(io.BytesIO(data))
    assert info is not None
    assert (info.platform, info.architecture, info.is_library) == expected


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"#!/bin/sh\n",
        b"MZ" + bytes(10),
        b"\xca\xfe\xba\xbe\x00\x00\x00\x34" + bytes(56),
    ],
)
def test_non_binaries_have_no_header(data: bytes) -> None:
    assert read_binary_info(io.BytesIO(data)) is None
