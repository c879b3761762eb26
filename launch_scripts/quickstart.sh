#!/usr/bin/env bash
# The README's first command: set up .venv (once), then run the whole pipeline on the embedded
# synthetic corpus: tokenizer -> shards -> verify. Everything lands in outputs/quickstart/
# (override with OUT=...). Rerunning resumes: completed steps are skipped.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source launch_scripts/setup_env.sh
OUT="${OUT:-outputs/quickstart}"
SOURCE="synthetic:docs=200,seed=1234,words=3000"
mkdir -p "$OUT"
step() { echo; echo "=== [quickstart] $* ==="; }

step "1/2 tokenizer: SentencePiece BPE, vocab 512, on $SOURCE"
if [ ! -f "$OUT/tokenizer/tokenizer_config.json" ]; then
    python -m tokenizer.train --input "$SOURCE" --vocab-size 512 --output "$OUT/tokenizer"
else
    echo "$OUT/tokenizer exists, skipping"
fi

step "2/2 shards: Megatron .bin/.idx + manifest.json"
python -m data_prep.prepare --source "$SOURCE" --tokenizer "$OUT/tokenizer" --output "$OUT/data" --workers 2
python -m data_prep.verify "$OUT/data"

echo
echo "[quickstart] tokenizer: $OUT/tokenizer   shards: $OUT/data/{train,validation,test}/"
