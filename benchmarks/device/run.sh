#!/usr/bin/env bash
# On the device, in the repo's root, with .whl carried (docs/gpu.md): the carried wheels into /tmp/site, then
# benchmarks/gpu.py stopped at its time limit ($1 seconds, default 480) so its headline still prints (further
# arguments go to gpu.py, e.g. --fast_fit false). Its output
# comes back as $OUT/gpu.txt (stdout, verbatim) and $OUT/gpu.err; the card and driver in $OUT/card.txt.
# With .cuvs/cuvs-sm90.tar.xz there (benchmarks/device/prepare_cuvs.sh; carried in this call, or in an earlier call
# to the same warm machine, where ignored paths stay), cuVS is unpacked beside the wheels and gpu.py adds its rows.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
if [ -f .cuvs/cuvs-sm90.tar.xz ]; then
    tar -xJf .cuvs/cuvs-sm90.tar.xz -C /tmp/site || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/card.txt"
python3 -c "import faiss, jsonargparse, transformers, lightning_memdec; print('transformers', transformers.__version__)" \
    || exit 1
python3 benchmarks/gpu.py --workdir /tmp/bench-gpu --time_limit_s "${1:-480}" "${@:2}" 2>"$OUT/gpu.err" | tee "$OUT/gpu.txt"
