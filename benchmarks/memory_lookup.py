"""Can MemMamba's memory learn a lookup that only the memory can carry? A controlled check of the read path.

    python -m benchmarks.memory_lookup [--pooling max,none] [--noise 0,0.3] [--steps 1200] [--cut 32] [--output DIR]

Each sample is 256 random filler tokens (ids 20-119) in which a marker (id 3) and a value (one of
the ids 10-19) stand at a random position in the first 160 tokens; the query token (id 4) stands
at position 254 and the target after it is the value. The loss is on that answer only. The Mamba2
mixers' state starts afresh every ``--cut`` tokens (``MemMambaModel.mixer_segment``, as
`train.mixer_segment_tokens` does), in training and in this check alike, so a value more than
``--cut`` tokens before the query's chunk reaches the answer only through the note pools.

One row per ``--pooling`` (`model.memory.pooling`) and ``--noise`` value (`train.note_selection_noise`):
the same model, seed and batches,
trained with a plain AdamW loop over the project's model code (not pretrain/main.py: this isolates
the memory from the data pipeline), then asked ``--held-out`` (512) held-out samples. It reports the accuracy on the
values beyond the cut with the memory as trained and with its output zeroed
(`pretrain.evaluate.zero_memory_output`; chance is 10%), and per layer how often the pool the query
reads holds a note that can carry the value (selection) apart from whether the answer uses it (the read). Writes results/memory_lookup.json and
prints a table; memory_lookup.png plots the held-out accuracy during training. The model is configs/repro_memory.yaml's MemMamba on a 128-token vocabulary.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import RESULTS, write_results
from model import ModelConfig, build_model
from model.config import POOLINGS, Mamba2Config, MemoryConfig
from pretrain.eval.render import pyplot, save
from pretrain.evaluate import captured_pools, memory_blocks, zero_memory_output

LENGTH, VOCAB, QUERY_AT = 256, 128, 254
MARKER, QUERY, VALUES, FILLER = 3, 4, (10, 20), (20, 120)
LAST_CHUNK_START = 224  # the query's chunk (chunks of 32 tokens)


def lookup_batch(size: int, max_position: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(size, 255) inputs, (size,) values to answer at position 254, (size,) the value's position."""
    ids = torch.randint(*FILLER, (size, LENGTH - 1), generator=gen)
    position = torch.randint(0, max_position, (size,), generator=gen) + 1
    value = torch.randint(*VALUES, (size,), generator=gen)
    rows = torch.arange(size)
    ids[rows, position - 1], ids[rows, position], ids[:, QUERY_AT] = MARKER, value, QUERY
    return ids, value, position


def model_config(pooling: str = "max") -> ModelConfig:
    return ModelConfig(arch="memmamba", vocab_size=VOCAB, d_model=64, n_layers=4, tie_embeddings=False,
                       mamba=Mamba2Config(d_state=16, headdim=16, expand=2, chunk_size=32),
                       memory=MemoryConfig(pool_size=8, notes_per_chunk=2, summary_dim=32, heads=2, cross_layer_every=2,
                                           pooling=pooling))


def check(model: torch.nn.Module, ids: torch.Tensor, value: torch.Tensor, position: torch.Tensor, cut: int
          ) -> tuple[float, list[float]]:
    """On the samples whose value lies beyond the cut: the answer accuracy, and per layer the fraction
    whose pool, as the query's chunk reads it, holds a note that can carry the value (a note at the
    value or after it in the value's mixer segment). Training mode keeps the cut (the model has no
    dropout); the selection noise is off."""
    blocks = memory_blocks(model)
    noise = [block.selection_noise for block in blocks]
    for block in blocks:
        block.selection_noise = 0.0
    model.train()
    try:
        with captured_pools(model) as captured, torch.no_grad():
            answers = model(ids)[:, QUERY_AT].argmax(-1)
    finally:
        for block, std in zip(blocks, noise):
            block.selection_noise = std
    far = position < LAST_CHUNK_START - cut
    query_chunk = LAST_CHUNK_START // model.config.mamba.chunk_size
    segment_end = (position // cut + 1) * cut
    carried = []
    for _, _, layer in captured:  # no EOD in these samples, so pool positions are token positions
        note_at = layer.positions.gather(1, layer.slots[:, query_chunk])  # (B, pool_size)
        holds = layer.slot_valid[:, query_chunk] & (note_at >= position[:, None]) & (note_at < segment_end[:, None])
        carried.append(round(holds.any(1)[far].float().mean().item(), 4))
    return (answers[far] == value[far]).float().mean().item(), carried


def train_and_check(pooling: str, noise: float, args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    model = build_model(model_config(pooling))
    model.backbone.mixer_segment = args.cut
    for block in memory_blocks(model):
        block.selection_noise = noise
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    held_out = lookup_batch(args.held_out, args.max_position, torch.Generator().manual_seed(args.seed + 1))
    start, curve = time.perf_counter(), []
    for step in range(1, args.steps + 1):
        ids, value, _ = lookup_batch(args.batch, args.max_position, gen)
        model.train()
        loss = F.cross_entropy(model(ids)[:, QUERY_AT], value)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % args.check_every == 0 or step == args.steps:
            accuracy, carried = check(model, *held_out, args.cut)
            curve.append({"step": step, "loss": loss.item(), "accuracy": accuracy, "value_in_pool": carried})
            print(f"pooling {pooling}, noise {noise}: step {step} loss {loss.item():.3f} accuracy beyond the cut "
                  f"{accuracy:.1%}, value in pool per layer {carried} ({time.perf_counter() - start:.0f} s)", flush=True)
    zeroed = copy.deepcopy(model)
    zero_memory_output(zeroed)
    far = held_out[2] < LAST_CHUNK_START - args.cut
    return {"pooling": pooling, "note_selection_noise": noise, "accuracy": curve[-1]["accuracy"],
            "accuracy_memory_zeroed": check(zeroed, *held_out, args.cut)[0], "value_in_pool": curve[-1]["value_in_pool"],
            "far_samples": int(far.sum()), "seconds": round(time.perf_counter() - start, 1), "curve": curve}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory_lookup", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pooling", default="max,none", help="comma-separated memory.pooling values")
    parser.add_argument("--noise", default="0,0.3", help="comma-separated note selection noise values; one row "
                        "per pooling and noise")
    parser.add_argument("--steps", type=int, default=1200, help="optimizer steps per row")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--cut", type=int, default=32, help="mixer state restarts every this many tokens (> 0)")
    parser.add_argument("--max-position", type=int, default=160, help="values stand in the first this many tokens")
    parser.add_argument("--check-every", type=int, default=300, help="steps between held-out checks")
    parser.add_argument("--held-out", type=int, default=512, help="held-out samples of the accuracy checks")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=RESULTS, help="folder of memory_lookup.json")
    args = parser.parse_args(argv)
    try:
        noises = [float(part) for part in args.noise.split(",")]
    except ValueError:
        parser.error(f"--noise: expected comma-separated numbers, got {args.noise!r}")
    poolings = args.pooling.split(",")
    if not set(poolings) <= set(POOLINGS):
        parser.error(f"--pooling: expected values of {', '.join(POOLINGS)}, got {args.pooling!r}")
    if any(n < 0 for n in noises) or args.cut <= 0 or not 0 < args.max_position < LAST_CHUNK_START - args.cut:
        parser.error(f"need --noise >= 0, --cut > 0 and 0 < --max-position < {LAST_CHUNK_START} - --cut")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    rows = [train_and_check(pooling, noise, args) for pooling in poolings for noise in noises]
    settings = {k: getattr(args, k) for k in ("steps", "batch", "lr", "cut", "max_position", "seed")}
    path = write_results("memory_lookup", {"settings": settings, "chance": 0.1, "rows": rows}, args.output)
    print("| pooling | note_selection_noise | accuracy beyond the cut | memory zeroed | value in pool (layers 0-3) |\n"
          "|---|---:|---:|---:|---|")
    for row in rows:
        print(f"| {row['pooling']} | {row['note_selection_noise']} | {row['accuracy']:.1%} | "
              f"{row['accuracy_memory_zeroed']:.1%} | {' / '.join(f'{v:.0%}' for v in row['value_in_pool'])} |")
    plot(rows, args.output / "memory_lookup.png")
    print(f"wrote {path} and memory_lookup.png")
    return 0


def plot(rows: list[dict], path: Path) -> None:
    fig, axis = pyplot().subplots(figsize=(6, 4))
    for row in rows:
        steps = [point["step"] for point in row["curve"]]
        line, = axis.plot(steps, [point["accuracy"] for point in row["curve"]], marker="o",
                          label=f"pooling {row['pooling']}, noise {row['note_selection_noise']}")
        axis.plot(steps[-1], row["accuracy_memory_zeroed"], "x", markersize=9, color=line.get_color())
    axis.axhline(0.1, color="grey", linestyle=":", label="chance; x: memory zeroed")
    axis.set_xlabel("optimizer step (batch of 16 x 256 tokens)")
    axis.set_ylabel("answers right, values beyond the cut")
    axis.legend(fontsize=7)
    fig.suptitle("One-token lookup through MemMamba's memory (mixer state cut; CPU)", fontsize=9)
    save(fig, path)


if __name__ == "__main__":
    sys.exit(main())
