"""benchmarks/device/keep_one_arch.py on a shared library built here with a synthetic ``.nv_fatbin`` section: only
the payloads of other architectures' entries are zeroed, in containers holding the kept architecture's ELF; the
kept entry, every header, a container without that ELF and the bytes outside the section stay as they were."""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not (shutil.which("gcc") and shutil.which("readelf")), reason="needs gcc, readelf")


def entry(kind: int, arch: int, payload: bytes) -> bytes:
    """A fatbin entry: a 64-byte header (kind, version, header size, payload size, ..., arch at byte 28), then the
    payload."""
    header = bytearray(64)
    struct.pack_into("<HHIQ", header, 0, kind, 0x0101, len(header), len(payload))
    struct.pack_into("<I", header, 28, arch)
    return bytes(header) + payload


def container(*entries: bytes) -> bytes:
    body = b"".join(entries)
    return struct.pack("<IHHQ", 0xBA55ED50, 1, 16, len(body)) + body


def test_only_other_architectures_payloads_in_containers_with_the_kept_elf_are_zeroed(tmp_path):
    rng = np.random.default_rng(0)

    def payload(n: int) -> bytes:
        return rng.integers(1, 256, n, dtype=np.uint8).tobytes()  # no zero byte: a zeroed one shows

    kept, ptx, ptx90, other = payload(40), payload(24), payload(48), payload(56)
    first = container(entry(2, 80, other), entry(2, 90, kept), entry(1, 120, ptx), entry(1, 90, ptx90))
    second = container(entry(2, 75, payload(32)), entry(1, 120, payload(16)))  # no sm_90 ELF: left whole
    section = first + bytes(8) + second  # containers are 8-byte aligned, padding between them
    source = tmp_path / "fatbin.c"
    array = ", ".join(str(b) for b in section)
    source.write_text(
        f'__attribute__((section(".nv_fatbin"), used)) const unsigned char fatbin[{len(section)}] = {{{array}}};\n'
        "int host_code(int x) { return 3 * x + 1; }\n"
    )
    library = tmp_path / "libfat.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    before = library.read_bytes()
    start = before.index(section)

    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "device" / "keep_one_arch.py"), "--arch", "90", str(library)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    after = library.read_bytes()
    assert "2 containers, 1 kept whole" in result.stdout
    assert len(after) == len(before) and after[:start] == before[:start]
    assert after[start + len(section) :] == before[start + len(section) :]
    got = after[start : start + len(section)]
    for zeroed in (other, ptx, ptx90):  # sm_90's PTX too: the driver runs its ELF
        first = first.replace(zeroed, bytes(len(zeroed)))
    want = first + bytes(8) + second
    assert got == want
    assert kept in got  # the kept architecture's code, byte for byte
