#!/usr/bin/env bash
# cuVS for a device call (docs/gpu.md, "The cuVS backend"), on this machine, from anywhere in the checkout: its wheels
# for the device's Python 3.12 installed into a scratch folder, what a Python import does not read removed (C++
# headers, CMake files; cuda-bindings, cuda-pathfinder and the nvidia libraries are on the device already), the device
# code of every GPU architecture but sm_90 (H100, H200) zeroed in place (benchmarks/device/keep_one_arch.py), then
# packed as .cuvs/cuvs-sm90.tar.xz (ignored by git). Whole, the stack is 237 MiB of wheels; packed so, 35 MiB, it fits
# one call with the tree and .whl. Prints the sizes. cuVS 26.6, not the newest: from 26.8 libcuvs links nvJitLink's
# 13.3 entry points (__nvJitLinkCreate_13_3, ...), which the device's CUDA 13.0 libraries (torch 2.11 pins
# cuda-toolkit 13.0.2) do not export, so it would not load there; 26.6 asks for nvJitLink >= 13.0.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
exclude=.git/info/exclude
mkdir -p "$(dirname "$exclude")" && touch "$exclude"
grep -qxF /.cuvs/ "$exclude" || echo /.cuvs/ >> "$exclude"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 -q -d "$scratch/wheels" \
    cuvs-cu13==26.6.0 libcuvs-cu13==26.6.0 libraft-cu13==26.6.0 librmm-cu13==26.6.0 pylibraft-cu13==26.6.0 \
    rmm-cu13==26.6.0 rapids-logger==0.2.3
python3 -m pip install -q --no-index --no-deps --no-compile --target "$scratch/site" --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --only-binary=:all: "$scratch"/wheels/*.whl
find "$scratch/site" \( -name include -o -name cmake -o -name share \) -type d -prune -exec rm -rf {} +
find "$scratch/site" -name '*.a' -delete
# identical files (auditwheel's libgomp, one copy a wheel) linked to one, which tar then stores once
find "$scratch/site" -type f -size +1M -exec sha256sum {} + | sort | awk 'seen[$1]++ { print first[$1], $2; next } \
    { first[$1] = $2 }' | while read -r kept copy; do ln -f "$kept" "$copy"; done
python3 benchmarks/device/keep_one_arch.py --arch 90 $(find "$scratch/site" -name '*.so' -size +1M)
tar -C "$scratch/site" -cf - . | xz -9 -T0 > "$scratch/cuvs-sm90.tar.xz"  # packed aside, as prepare.sh packs
mkdir -p .cuvs && mv "$scratch/cuvs-sm90.tar.xz" .cuvs/cuvs-sm90.tar.xz
echo "wheels $(du -cb "$scratch"/wheels/*.whl | tail -1 | cut -f1 | awk '{printf "%.1f", $1/1048576}') MiB," \
     "packed $(du -b .cuvs/cuvs-sm90.tar.xz | cut -f1 | awk '{printf "%.1f", $1/1048576}') MiB: .cuvs/cuvs-sm90.tar.xz"
