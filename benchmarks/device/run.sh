#!/usr/bin/env bash
# On the device, in the repo's root, with .whl carried (docs/gpu.md): the packed packages (benchmarks/device/
# prepare.sh) unpacked into /tmp/site, then benchmarks/gpu.py stopped at its time limit ($1 seconds, default 480) so
# its headline still prints (further arguments go to gpu.py, e.g. --fast_fit false). Its output comes back as
# $OUT/gpu.txt (stdout, verbatim) and $OUT/gpu.err; the card and driver in $OUT/card.txt.
# With .cuvs carried too (benchmarks/device/prepare_cuvs.sh), cuVS is unpacked beside them and gpu.py adds its rows.
set -uo pipefail
mkdir -p /tmp/site
tar -xJf .whl/site.tar.xz -C /tmp/site || exit 1
if [ -f .cuvs/cuvs-sm90.tar.xz ]; then
    tar -xJf .cuvs/cuvs-sm90.tar.xz -C /tmp/site || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/card.txt"
# the CUDA libraries cuVS links against, as the image has them (cuvs_import_error, if any, is read against these)
python3 -m pip show nvidia-nvjitlink nvidia-cublas cuda-bindings 2>/dev/null | grep -E '^(Name|Version):' \
    | paste - - | tee -a "$OUT/card.txt"
python3 -c "import faiss, jsonargparse, transformers, lightning_memdec; print('transformers', transformers.__version__)" \
    || exit 1
python3 benchmarks/gpu.py --workdir /tmp/bench-gpu --time_limit_s "${1:-480}" "${@:2}" 2>"$OUT/gpu.err" | tee "$OUT/gpu.txt"
