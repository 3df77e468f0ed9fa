#!/usr/bin/env bash
# After a device call: the embedded base LMs back in git's index (as in HEAD) and no longer ignored; .whl/ stays
# ignored. Undoes benchmarks/device/prepare.sh's step 2.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
git reset -q -- lightning_memdec/assets/models
sed -i '\#^/lightning_memdec/assets/models/$#d' .git/info/exclude
git status --short lightning_memdec/assets/models
