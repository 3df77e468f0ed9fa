#!/usr/bin/env bash
# After a device call: the embedded base LMs, corpora, GPT-NeoX tokenizer and docs/ back in git's index (as in HEAD), no
# longer ignored; .whl/ and .cuvs/ stay ignored. Undoes benchmarks/device/prepare.sh's step 2.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
left_out=(lightning_memdec/assets/models lightning_memdec/assets/corpora lightning_memdec/assets/tokenizers/gpt-neox-20b docs)
git reset -q -- "${left_out[@]}"
for path in "${left_out[@]}"; do
    sed -i "\\#^/$path/\$#d" .git/info/exclude
done
git status --short "${left_out[@]}"
