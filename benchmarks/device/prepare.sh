#!/usr/bin/env bash
# Before a device call (docs/gpu.md, "The prepared GPU run"), on this machine, from anywhere in the checkout:
#  1. the Python packages the device lacks, for its Python 3.12, installed into a scratch folder as pip would install
#     them there, and packed as .whl/site.tar.xz (ignored by git; run.sh unpacks it into /tmp/site): faiss-cpu (not
#     in its image), transformers >= 5.24 (its 5.17 lacks the generation `cache` field InterpolatedLM reads; regex >=
#     2025.10.22 with it, checked at import), jsonargparse and omegaconf (the configs) with jsonargparse's signature
#     helpers. 32 MiB of wheels pack into 14 MiB;
#  2. the embedded base LMs, corpora and GPT-NeoX tokenizer (lightning_memdec/assets: 53 + 7.5 + 3.4 MiB) and docs/
#     (6 MiB of results), none read by benchmarks/gpu.py, left out of what a call sends: the tracked tree is 74 MiB, a
#     call sends at most 64 MiB (about 5 MiB then, so a call also holds .whl and prepare_cuvs.sh's .cuvs). They are removed from git's index only
#     (the files stay on disk) and ignored until benchmarks/device/restore.sh puts them back: run it before any commit.
# Prints the size of what will travel.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
exclude=.git/info/exclude
mkdir -p "$(dirname "$exclude")" && touch "$exclude"
left_out=(lightning_memdec/assets/models lightning_memdec/assets/corpora lightning_memdec/assets/tokenizers/gpt-neox-20b docs)
for pattern in /.whl/ "${left_out[@]/#//}"; do
    pattern=${pattern%/}/
    grep -qxF "$pattern" "$exclude" || echo "$pattern" >> "$exclude"
done
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
    -q -d "$scratch/wheels" faiss-cpu==1.15.1 transformers==5.24.0 regex==2026.11.19 jsonargparse==4.53.0 \
    omegaconf==2.4.0 docstring-parser==0.18.0 typeshed-client==2.15.0
python3 -m pip install -q --no-index --no-deps --no-compile --target "$scratch/site" --only-binary=:all: \
    --python-version 3.12 --implementation cp "${platforms[@]}" "$scratch"/wheels/*.whl
tar -C "$scratch/site" -cf - . | xz -9 -T0 > "$scratch/site.tar.xz"  # packed aside: a failure leaves .whl as it was
rm -rf .whl && mkdir -p .whl && mv "$scratch/site.tar.xz" .whl/site.tar.xz
git rm -r -q --cached "${left_out[@]}"
tree=$( (git ls-files -z; git ls-files -z --others --exclude-standard) | du -cb --files0-from=- | tail -1 | cut -f1)
packed=$(du -b .whl/site.tar.xz | cut -f1)
cuvs=$( [ -f .cuvs/cuvs-sm90.tar.xz ] && du -b .cuvs/cuvs-sm90.tar.xz | cut -f1 || echo 0)
echo "travels: tree $((tree / 1048576)) MiB + .whl $((packed / 1048576)) MiB + .cuvs (if carried) $((cuvs / 1048576))" \
     "MiB (limit 64 MiB a call); run benchmarks/device/restore.sh before committing"
