"""What MemMamba's note pools hold when the passkey question is asked: is the needle still there?

    python -m benchmarks.pool_contents --model RUN [--lengths 1024,4096,16384] [--depths 0,0.5,1]
                                       [--trials 4] [--output FILE.json]

For each passkey prompt (pretrain/eval/passkey.py, unchanged; random 5-digit keys, seed 0), one
parallel forward pass with hooks on every MemoryBlock records the pool as it
stands after the prompt's last chunk, i.e. what the question's tokens read. Per layer it reports:

- ``kept``: the fraction of prompts whose pool holds at least one note of the needle sentence
  (a note at a token of the needle; its pooling window ends there);
- ``needle_score`` / ``filler_score``: the mean over prompts of the highest note score s_t among the
  needle's tokens and among the filler's (with priority eviction a needle note survives any length
  of filler when it scores above all of it).

This separates the two halves of retrieval through memory: keeping the needle (retention, the
scorer) and reading it into the answer (the cross-token / cross-layer reads and the fusion). The
passkey accuracy itself comes from ``pretrain.evaluate``. Prints one table; writes JSON with --output.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import numpy as np
import torch

from fileio import write_json_atomic
from model.documents import ChunkLayout
from pretrain.eval.passkey import make_prompt
from pretrain.evaluate import LoadedModel, captured_pools, load_model, memory_blocks


def pool_after_prompt(loaded: LoadedModel, tokens: torch.Tensor) -> list[dict]:
    """Per MemoryBlock: its final pool's token positions (in the prompt) and every token's note score."""
    model, ids = loaded.model, tokens.view(1, -1)
    with captured_pools(model) as captured, torch.no_grad():
        model(ids)
    layout = ChunkLayout.build(ids.shape[1], model.config.mamba.chunk_size, model.document_ids(ids))
    rows = torch.arange(ids.shape[1]) if layout.index is None else layout.index[0]
    token_at_row = {int(row): t for t, row in enumerate(rows.tolist())}  # pool positions are buffer rows
    layers = []
    for block, y, pools in captured:
        _, _, positions, valid = pools.pool_after(torch.tensor([pools.slots.shape[1] - 1]))
        kept = [token_at_row[int(p)] for p in positions[0][valid[0]].tolist() if int(p) in token_at_row]
        with torch.no_grad():
            scores = block._scores(y)[0][0]
        layers.append({"positions": sorted(kept), "scores": scores})
    return layers


def inspect(loaded: LoadedModel, lengths: list[int], depths: list[float], trials: int, seed: int = 0) -> dict:
    """{"lengths", "depths", "trials", "layers": [per layer {"kept", "needle_score", "filler_score"}: {length: value}]}."""
    rng = random.Random(seed)
    means = {}  # length -> (layers, 3): kept, needle's top score, filler's top score, over the prompts
    for length in lengths:
        prompts = []
        for depth in depths:
            for _ in range(trials):
                prompt = make_prompt(loaded.tokenizer, length, depth, rng.randint(10000, 99999))
                start, end = prompt.needle_start, prompt.needle_start + len(prompt.needle_tokens)
                prompts.append([[float(any(start <= p < end for p in layer["positions"])),
                                 float(layer["scores"][start:end].max()),
                                 float(torch.cat([layer["scores"][:start], layer["scores"][end:]]).max())]
                                for layer in pool_after_prompt(loaded, torch.as_tensor(prompt.tokens))])
        means[str(length)] = np.mean(prompts, axis=0)
    layers = [{"kept": {n: float(m[i, 0]) for n, m in means.items()},
               "needle_score": {n: round(float(m[i, 1]), 4) for n, m in means.items()},
               "filler_score": {n: round(float(m[i, 2]), 4) for n, m in means.items()}}
              for i in range(len(next(iter(means.values()))))]
    return {"lengths": lengths, "depths": depths, "trials": trials, "layers": layers}


def table(result: dict) -> str:
    header = "| layer | " + " | ".join(f"kept@{n}" for n in result["lengths"]) + " | needle / filler top score |"
    rows = [header, "|---:|" + "---:|" * (len(result["lengths"]) + 1)]
    first = str(result["lengths"][0])
    for i, layer in enumerate(result["layers"]):
        kept = " | ".join(f"{layer['kept'][str(n)]:.0%}" for n in result["lengths"])
        rows.append(f"| {i} | {kept} | {layer['needle_score'][first]:.2f} / {layer['filler_score'][first]:.2f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pool_contents", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a MemMamba training run or checkpoint directory")
    parser.add_argument("--lengths", default="1024,4096,16384", help="passkey prompt lengths (default: %(default)s)")
    parser.add_argument("--depths", default="0,0.5,1", help="needle depths (default: %(default)s)")
    parser.add_argument("--trials", type=int, default=4, help="prompts per (length, depth) (default: %(default)s)")
    parser.add_argument("--output", type=Path, help="JSON file to write")
    args = parser.parse_args(argv)
    try:
        loaded = load_model(args.model)
        if not memory_blocks(loaded.model) or loaded.kind == "hf":
            raise ValueError(f"--model {args.model}: expected a MemMamba training run or checkpoint (not an HF export)")
        if loaded.tokenizer is None:
            raise ValueError(f"--model {args.model}: no tokenizer found (its config's data.tokenizer)")
        result = inspect(loaded, [int(n) for n in args.lengths.split(",")],
                         [float(d) for d in args.depths.split(",")], args.trials)
    except ValueError as e:
        print(f"pool_contents: {e}", file=sys.stderr)
        return 2
    result["model"] = str(args.model)
    print(table(result))
    if args.output:
        write_json_atomic(args.output, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
