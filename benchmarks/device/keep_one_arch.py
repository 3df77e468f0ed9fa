"""Zero, in CUDA shared libraries, the device code built for GPUs other than one architecture, so that a library
built for every GPU (cuVS's libcuvs.so: 291 MB, 212 MB of it device code for sm_75 … sm_120 and PTX) travels to
a device call's 64 MiB carry compressed to a fraction of that.

A library's ``.nv_fatbin`` section is a run of fatbin containers (magic 0xBA55ED50), each holding one entry per
target: a header (kind 1 PTX / 2 ELF, payload size, architecture) and the payload. When the library is loaded on a
GPU, the driver takes the entry built for that GPU's architecture and reads no other. Where a container holds an ELF
entry for ``--arch`` (90: the H100 and H200), the payloads of its other entries are overwritten with zeros in place:
every size and offset stays as it was, the entry for the kept architecture is unchanged, and the zeros compress to
nothing. A container without such an entry is left whole. Only for carrying a library to a known GPU; the
measurements it allows are of the unchanged code that GPU runs.

Usage: ``python benchmarks/device/keep_one_arch.py --arch 90 LIB.so [LIB.so ...]`` (in place; prints what it zeroed).
"""

from __future__ import annotations

import argparse
import mmap
import struct
import subprocess
from pathlib import Path

FATBIN_MAGIC = 0xBA55ED50
CONTAINER = struct.Struct("<IHHQ")  # magic, version, header size, size of the entries after the header
ENTRY = struct.Struct("<HHIQ")  # kind (1 PTX, 2 ELF), version, header size, payload size
ARCH_OFFSET = 28  # of the entry's target architecture (e.g. 90 for sm_90) within its header


def fatbin_section(path: Path) -> tuple[int, int]:
    """(file offset, size) of ``path``'s ``.nv_fatbin`` section, by readelf; (0, 0) where it has none."""
    listing = subprocess.run(["readelf", "-S", "-W", str(path)], capture_output=True, text=True, check=True).stdout
    for line in listing.splitlines():
        if "] .nv_fatbin " in line:
            fields = line.split("]", 1)[1].split()  # name, type, address, offset, size, ...
            return int(fields[3], 16), int(fields[4], 16)
    return 0, 0


def containers(data, start: int, end: int):
    """(offset, entries) of each fatbin container in ``data[start:end]``; entries: (kind, arch, payload offset,
    payload size). Containers are 8-byte aligned, with padding between them."""
    pos = start
    while pos + CONTAINER.size <= end:
        magic, _version, header, size = CONTAINER.unpack_from(data, pos)
        if magic != FATBIN_MAGIC:
            pos += 8
            continue
        entries, e = [], pos + header
        while e < pos + header + size:
            kind, _v, entry_header, payload = ENTRY.unpack_from(data, e)
            (arch,) = struct.unpack_from("<I", data, e + ARCH_OFFSET)
            entries.append((kind, arch, e + entry_header, payload))
            e += entry_header + payload
        if e != pos + header + size:
            raise ValueError(f"container at {pos:#x}: entries end at {e:#x}, not {pos + header + size:#x}")
        yield pos, entries
        pos += header + size


def keep_one_arch(path: Path, arch: int) -> tuple[int, int, int]:
    """Zero, in place, the payloads of every entry but ``arch``'s ELF in the containers that have one; returns
    (containers, containers kept whole, bytes zeroed)."""
    start, size = fatbin_section(path)
    found = whole = zeroed = 0
    if not size:
        return found, whole, zeroed
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0) as data:
        for _pos, entries in containers(data, start, start + size):
            found += 1
            if not any(kind == 2 and a == arch for kind, a, _, _ in entries):
                whole += 1
                continue
            for kind, a, offset, payload in entries:
                if not (kind == 2 and a == arch):
                    data[offset : offset + payload] = bytes(payload)
                    zeroed += payload
        data.flush()
    return found, whole, zeroed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, required=True, help="the GPU architecture to keep, e.g. 90 (sm_90)")
    parser.add_argument("libraries", nargs="+", type=Path)
    args = parser.parse_args()
    for path in args.libraries:
        found, whole, zeroed = keep_one_arch(path, args.arch)
        print(
            f"{path}: {found} containers, {whole} kept whole (no sm_{args.arch} ELF), {zeroed / 2**20:.1f} MiB zeroed"
        )


if __name__ == "__main__":
    main()
