"""Platform and architecture of executables and libraries, read from their headers.

Only the fixed header fields are read (ELF e_ident and e_machine, the PE COFF
Machine field, the Mach-O cputype), so this needs no parsing library.
Sources: the System V ABI ELF header, the Microsoft PE format
specification, and Apple's <mach-o/loader.h> and <mach/machine.h>.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import BinaryIO

_ELF_MACHINES = {
    0x03: "x86",
    0x08: "mips",
    0x14: "ppc",
    0x15: "ppc64",
    0x16: "s390x",
    0x28: "arm",
    0x32: "ia64",
    0x3E: "x64",
    0xB7: "arm64",
    0xF3: "riscv",
    0x102: "loongarch",
}
_ELF_TYPE_EXEC = 2
_ELF_TYPE_DYN = 3

_PE_MACHINES = {
    0x014C: "x86",
    0x8664: "x64",
    0x01C0: "arm",
    0x01C4: "arm",
    0xAA64: "arm64",
    0x0200: "ia64",
}
_PE_DLL_FLAG = 0x2000

_MACHO_CPU_ABI64 = 0x01000000
_MACHO_CPUS = {
    7: "x86",
    7 | _MACHO_CPU_ABI64: "x64",
    12: "arm",
    12 | _MACHO_CPU_ABI64: "arm64",
    18: "ppc",
    18 | _MACHO_CPU_ABI64: "ppc64",
}
_MACHO_DYLIB = 6
_MACHO_BUNDLE = 8
_MACHO_MAGICS = {
    b"\xfe\xed\xfa\xce": ">",
    b"\xfe\xed\xfa\xcf": ">",
    b"\xce\xfa\xed\xfe": "<",
    b"\xcf\xfa\xed\xfe": "<",
}
_MACHO_FAT = b"\xca\xfe\xba\xbe"


@dataclass(frozen=True)
class BinaryInfo:
    """Facts from a binary header: platform, architecture and shared-library flag."""

    platform: str
    architecture: str
    is_library: bool


def read_binary_info(stream: BinaryIO) -> BinaryInfo | None:
    """Return the header facts of an ELF, PE or Mach-O file, or None for other files."""
    head = stream.read(64)
    if head.startswith(b"\x7fELF"):
        return _read_elf(head)
    if head.startswith(b"MZ"):
        return _read_pe(stream, head)
    if head[:4] in _MACHO_MAGICS:
        return _read_macho(head)
    if head[:4] == _MACHO_FAT:
        return _read_fat_macho(head)
    return None


def _read_elf(head: bytes) -> BinaryInfo | None:
    if len(head) < 20:
        return None
    order = "<" if head[5] == 1 else ">"
    file_type, machine = struct.unpack_from(order + "HH", head, 16)
    architecture = _ELF_MACHINES.get(machine, f"elf-machine-{machine}")
    return BinaryInfo("linux", architecture, file_type == _ELF_TYPE_DYN)


def _read_pe(stream: BinaryIO, head: bytes) -> BinaryInfo | None:
    if len(head) < 0x40:
        return None
    (pe_offset,) = struct.unpack_from("<I", head, 0x3C)
    stream.seek(pe_offset)
    coff = stream.read(24)
    if len(coff) < 24 or not coff.startswith(b"PE\x00\x00"):
        return None
    (machine,) = struct.unpack_from("<H", coff, 4)
    (characteristics,) = struct.unpack_from("<H", coff, 22)
    architecture = _PE_MACHINES.get(machine, f"pe-machine-{machine:#06x}")
    return BinaryInfo("windows", architecture, bool(characteristics & _PE_DLL_FLAG))


def _read_macho(head: bytes) -> BinaryInfo | None:
    if len(head) < 16:
        return None
    order = _MACHO_MAGICS[head[:4]]
    cpu_type, _subtype, file_type = struct.unpack_from(order + "iII", head, 4)
    architecture = _MACHO_CPUS.get(cpu_type, f"macho-cpu-{cpu_type}")
    is_library = file_type in (_MACHO_DYLIB, _MACHO_BUNDLE)
    return BinaryInfo("macos", architecture, is_library)


def _read_fat_macho(head: bytes) -> BinaryInfo | None:
    # Java class files start with the same magic. A fat header counts a few
    # architectures there, but a class file has its version number (45 or more).
    (count,) = struct.unpack_from(">I", head, 4)
    if not 0 < count < 20:
        return None
    cpus = sorted(
        _MACHO_CPUS.get(struct.unpack_from(">i", head, 8 + 20 * index)[0], "unknown")
        for index in range(min(count, 2))
    )
    return BinaryInfo("macos", "universal" if len(cpus) > 1 else cpus[0], False)
