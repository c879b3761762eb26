#!/usr/bin/env bash
# The README's first command: set up .venv (once), then run the whole pipeline on the embedded
# synthetic corpus: tokenizer -> shards -> 2-process ZeRO-3 curriculum pretraining (CPU, gloo)
# -> Hugging Face export -> generation through transformers -> evaluation. Everything lands in
# outputs/quickstart/ (override with OUT=...). Rerunning resumes: completed steps are skipped.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source launch_scripts/setup_env.sh
OUT="${OUT:-outputs/quickstart}"
SOURCE="synthetic:docs=200,seed=1234,words=3000"
mkdir -p "$OUT"
step() { echo; echo "=== [quickstart] $* ==="; }

step "1/6 tokenizer: SentencePiece BPE, vocab 512, on $SOURCE"
if [ ! -f "$OUT/tokenizer/tokenizer_config.json" ]; then
    python -m tokenizer.train --input "$SOURCE" --vocab-size 512 --output "$OUT/tokenizer"
else
    echo "$OUT/tokenizer exists, skipping"
fi

step "2/6 shards: Megatron .bin/.idx + manifest.json"
python -m data_prep.prepare --source "$SOURCE" --tokenizer "$OUT/tokenizer" --output "$OUT/data" --workers 2
python -m data_prep.verify "$OUT/data"

step "3/6 pretrain: deepspeed --num_gpus 2, ZeRO-3, curriculum 256 -> 512 -> 1024 (configs/quickstart.yaml)"
deepspeed --num_gpus 2 pretrain/main.py --config configs/quickstart.yaml --run-dir "$OUT/run" \
    --set data.path="$OUT/data" --set data.tokenizer="$OUT/tokenizer"

step "4/6 export: DeepSpeed checkpoint -> Hugging Face directory"
python -m pretrain.export --checkpoint "$OUT/run" --output "$OUT/hf" --force

step "5/6 generate: transformers AutoModelForCausalLM + AutoTokenizer from the exported directory"
(cd "$OUT" && PYTHONPATH= python -I - hf <<'PY'
import sys
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
tok = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True)  # the config is remote code too
prompt = "Who is the keeper of the north gate? The keeper of the north gate is"
ids = tok(prompt, return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=24, do_sample=False)
print(repr(prompt + tok.decode(out[0, ids.shape[1]:])))
PY
)

step "6/6 evaluate: perplexity by length, passkey retrieval, memory fidelity"
python -m pretrain.evaluate --model "$OUT/hf" --data "$OUT/data" --split test --tasks ppl,passkey,fidelity \
    --lengths 256,512,1024 --output "$OUT/eval"

echo
echo "[quickstart] done. tokenizer: $OUT/tokenizer  shards: $OUT/data  run: $OUT/run (tensorboard --logdir $OUT/run/tensorboard)"
echo "[quickstart] HF model: $OUT/hf  evaluation: $OUT/eval/summary.md"
