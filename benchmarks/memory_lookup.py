"""Can MemMamba's memory learn a lookup that only the memory can carry? A controlled check of the read path.

    python -m benchmarks.memory_lookup [--pooling max,none] [--noise 0,0.3] [--steps 1200] [--cut 32]
                                       [--value-tokens 1] [--notes-per-chunk 2] [--pool-size 8] [--pool-window 4]
                                       [--tau1 0.5] [--oracle-selection] [--tag NAME] [--output DIR]

Each sample is 256 random filler tokens (ids 20-119) in which a marker (id 3) and a value of
``--value-tokens`` tokens (each one of the ids 10-19) stand at a random position in the first 160
tokens; the query token (id 4) stands in the last chunk, and the targets from it on are the value's
tokens in order (teacher-forced: the value's first tokens follow the query as inputs, as a passkey's
digits do when they are answered one by one). The loss is on those answers only. The Mamba2
mixers' state starts afresh every ``--cut`` tokens (``MemMambaModel.mixer_segment``, as
`train.mixer_segment_tokens` does), in training and in this check alike, so a value more than
``--cut`` tokens before the query's chunk reaches the answer only through the note pools.

One row per ``--pooling`` (`model.memory.pooling`) and ``--noise`` value (`train.note_selection_noise`):
the same model, seed and batches,
trained with a plain AdamW loop over the project's model code (not pretrain/main.py: this isolates
the memory from the data pipeline), then asked ``--held-out`` (512) held-out samples. It reports the accuracy on the
values beyond the cut with the memory as trained and with its output zeroed
(`pretrain.evaluate.zero_memory_output`; chance is 10% per token), the share of values answered
whole, and per layer how often the pool the query reads holds a note that can carry each value
token (selection) apart from whether the answer uses it (the read). Writes results/memory_lookup.json
(memory_lookup_<K>tokens.json for a value of K > 1 tokens, with ``_<tag>`` appended for ``--tag``) and
prints a table; the .png of the same name plots the held-out accuracy during training. The model is
configs/repro_memory.yaml's MemMamba on a 128-token vocabulary, with ``--notes-per-chunk``,
``--pool-size``, ``--pool-window`` and ``--tau1`` as its memory's.

``--oracle-selection`` takes selection out of the question: every layer picks and keeps the value's
tokens as notes (``OracleSelection``), in training and in the check, so the accuracy is what the
reads can do with the value in the pool, and the gap to a run without it is what selection costs.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import RESULTS, write_results
from model import ModelConfig, build_model
from model.config import POOLINGS, Mamba2Config, MemoryConfig
from pretrain.eval.render import pyplot, save
from pretrain.evaluate import captured_pools, memory_blocks, zero_memory_output

LENGTH, VOCAB = 256, 128
QUERY_AT = 254  # the query of a one-token value; the last answer of any value (a K-token value's query stands K - 1 earlier)
MARKER, QUERY, VALUES, FILLER = 3, 4, (10, 20), (20, 120)
LAST_CHUNK_START = 224  # the query's chunk (chunks of 32 tokens)


def query_position(value_tokens: int) -> int:
    """The query's position: its answers (the value's tokens in order) are predicted at it and after it, up to 254."""
    return QUERY_AT - value_tokens + 1


def lookup_batch(size: int, max_position: int, gen: torch.Generator, value_tokens: int = 1
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(size, 255) inputs, (size, value_tokens) values to answer from the query on, (size,) the value's first position."""
    ids = torch.randint(*FILLER, (size, LENGTH - 1), generator=gen)
    position = torch.randint(0, max_position, (size,), generator=gen) + 1
    value = torch.randint(*VALUES, (size, value_tokens), generator=gen)
    rows, query = torch.arange(size), query_position(value_tokens)
    ids[rows, position - 1], ids[:, query] = MARKER, QUERY
    ids[rows[:, None], position[:, None] + torch.arange(value_tokens)] = value
    ids[:, query + 1:] = value[:, :-1]
    return ids, value, position


def beyond_cut(position: torch.Tensor, value_tokens: int, cut: int) -> torch.Tensor:
    """(B,) bool: the whole value (from ``position`` on) lies more than ``cut`` tokens before the query's chunk."""
    return position + value_tokens - 1 < LAST_CHUNK_START - cut


class OracleSelection:
    """Every layer picks and keeps the value's tokens as notes: a bias of 10 on the scores that pick and
    keep notes (never on those that scale them) at the value's positions. What the reads can do when
    selection is perfect; ``bias`` is set per batch by ``aim``."""

    def __init__(self, model: torch.nn.Module):
        self.bias: torch.Tensor | None = None
        for block in memory_blocks(model):
            block._chunk_notes = self._biased(block._chunk_notes)

    def _biased(self, chunk_notes: Callable) -> Callable:
        def picked_with_bias(history, s, start, history_doc=None, rank=None):  # training's call: s from position 0
            rank = (s if rank is None else rank) + self.bias[:, :s.shape[1]]
            return chunk_notes(history, s, start, history_doc, rank)
        return picked_with_bias

    def aim(self, position: torch.Tensor, value_tokens: int) -> None:
        self.bias = torch.zeros(position.shape[0], LENGTH)
        self.bias[torch.arange(position.shape[0])[:, None], position[:, None] + torch.arange(value_tokens)] = 10.0


def model_config(pooling: str = "max", notes_per_chunk: int = 2, pool_size: int = 8, tau1: float = 0.5,
                 pool_window: int = 4) -> ModelConfig:
    return ModelConfig(arch="memmamba", vocab_size=VOCAB, d_model=64, n_layers=4, tie_embeddings=False,
                       mamba=Mamba2Config(d_state=16, headdim=16, expand=2, chunk_size=32),
                       memory=MemoryConfig(pool_size=pool_size, notes_per_chunk=notes_per_chunk, summary_dim=32, heads=2,
                                           cross_layer_every=2, pooling=pooling, tau1=tau1,
                                           pool_window=pool_window))


def answer_logits(model: torch.nn.Module, ids: torch.Tensor, value_tokens: int) -> torch.Tensor:
    """(B, value_tokens, V): the logits that answer the value's tokens."""
    return model(ids)[:, query_position(value_tokens):QUERY_AT + 1]


def check(model: torch.nn.Module, ids: torch.Tensor, value: torch.Tensor, position: torch.Tensor, cut: int,
          oracle: OracleSelection | None = None) -> tuple[list[float], float, list[float]]:
    """On the samples whose whole value lies beyond the cut: the share answered right of each of the
    value's tokens (in order), the share of values answered whole, and per layer the share of value tokens that the pool, as the
    query's chunk reads it, holds a note able to carry (a note at the token or after it in the token's
    mixer segment). Training mode keeps the cut (the model has no dropout); the selection noise is off."""
    blocks = memory_blocks(model)
    noise = [block.selection_noise for block in blocks]
    for block in blocks:
        block.selection_noise = 0.0
    model.train()
    if oracle is not None:
        oracle.aim(position, value.shape[1])
    try:
        with captured_pools(model) as captured, torch.no_grad():
            answers = answer_logits(model, ids, value.shape[1]).argmax(-1)  # (B, K)
    finally:
        for block, std in zip(blocks, noise):
            block.selection_noise = std
    tokens_at = position[:, None] + torch.arange(value.shape[1])  # (B, K)
    far = beyond_cut(position, value.shape[1], cut)
    query_chunk = LAST_CHUNK_START // model.config.mamba.chunk_size
    segment_end = (tokens_at // cut + 1) * cut
    carried = []
    for _, _, layer in captured:  # no EOD in these samples, so pool positions are token positions
        note_at = layer.positions.gather(1, layer.slots[:, query_chunk])[:, None]  # (B, 1, pool_size)
        holds = (layer.slot_valid[:, query_chunk, None] & (note_at >= tokens_at[..., None])
                 & (note_at < segment_end[..., None]))  # (B, K, pool_size)
        carried.append(round(holds.any(-1)[far].float().mean().item(), 4))
    right = answers[far] == value[far]
    return [round(v, 4) for v in right.float().mean(0).tolist()], right.all(-1).float().mean().item(), carried


def train_and_check(pooling: str, noise: float, args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    model = build_model(model_config(pooling, args.notes_per_chunk, args.pool_size, args.tau1, args.pool_window))
    model.backbone.mixer_segment = args.cut
    for block in memory_blocks(model):
        block.selection_noise = noise
    oracle = OracleSelection(model) if args.oracle_selection else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    held_out = lookup_batch(args.held_out, args.max_position, torch.Generator().manual_seed(args.seed + 1),
                            args.value_tokens)
    start, curve = time.perf_counter(), []
    for step in range(1, args.steps + 1):
        ids, value, position = lookup_batch(args.batch, args.max_position, gen, args.value_tokens)
        if oracle is not None:
            oracle.aim(position, args.value_tokens)
        model.train()
        loss = F.cross_entropy(answer_logits(model, ids, args.value_tokens).flatten(0, 1), value.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % args.check_every == 0 or step == args.steps:
            by_token, whole, carried = check(model, *held_out, args.cut, oracle)
            accuracy = sum(by_token) / len(by_token)
            curve.append({"step": step, "loss": loss.item(), "accuracy": accuracy, "accuracy_by_token": by_token,
                          "whole_values": whole, "value_in_pool": carried})
            print(f"pooling {pooling}, noise {noise}: step {step} loss {loss.item():.3f} accuracy beyond the cut "
                  f"{accuracy:.1%} (by token {by_token}, {whole:.1%} of values whole), value in pool per layer {carried} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    zero_memory_output(model)  # the trained model's last use: its check with the memory zeroed
    far = beyond_cut(held_out[2], args.value_tokens, args.cut)
    zeroed_by_token = check(model, *held_out, args.cut, oracle)[0]
    return {"pooling": pooling, "note_selection_noise": noise, "accuracy": curve[-1]["accuracy"],
            "accuracy_by_token": curve[-1]["accuracy_by_token"], "whole_values": curve[-1]["whole_values"],
            "accuracy_memory_zeroed": sum(zeroed_by_token) / len(zeroed_by_token),
            "value_in_pool": curve[-1]["value_in_pool"],
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
    parser.add_argument("--max-position", type=int, default=160, help="values start in the first this many tokens")
    parser.add_argument("--value-tokens", type=int, default=1, help="tokens of a value, answered in order (1-30)")
    parser.add_argument("--notes-per-chunk", type=int, default=2, help="memory.notes_per_chunk")
    parser.add_argument("--pool-size", type=int, default=8, help="memory.pool_size")
    parser.add_argument("--pool-window", type=int, default=4, help="memory.pool_window: the tokens a note pools")
    parser.add_argument("--tau1", type=float, default=0.5, help="memory.tau1: the score a token needs to become a note")
    parser.add_argument("--oracle-selection", action="store_true", help="every layer picks and keeps the "
                        "value's tokens as notes: the reads with perfect selection")
    parser.add_argument("--check-every", type=int, default=300, help="steps between held-out checks")
    parser.add_argument("--held-out", type=int, default=512, help="held-out samples of the accuracy checks")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tag", default="", help="appended to the results' name: memory_lookup[_<K>tokens][_<tag>]")
    parser.add_argument("--output", type=Path, default=RESULTS, help="folder of memory_lookup.json")
    args = parser.parse_args(argv)
    try:
        noises = [float(part) for part in args.noise.split(",")]
    except ValueError:
        parser.error(f"--noise: expected comma-separated numbers, got {args.noise!r}")
    poolings = args.pooling.split(",")
    if not set(poolings) <= set(POOLINGS):
        parser.error(f"--pooling: expected values of {', '.join(POOLINGS)}, got {args.pooling!r}")
    if not 1 <= args.value_tokens <= QUERY_AT - LAST_CHUNK_START:
        parser.error(f"--value-tokens: expected 1 to {QUERY_AT - LAST_CHUNK_START} (the answers fit the last chunk), "
                     f"got {args.value_tokens}")
    if any(n < 0 for n in noises) or args.cut <= 0 or not 0 < args.max_position + args.value_tokens - 1 < LAST_CHUNK_START - args.cut:
        parser.error(f"need --noise >= 0, --cut > 0 and 0 < --max-position + --value-tokens - 1 < {LAST_CHUNK_START} - --cut")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    rows = [train_and_check(pooling, noise, args) for pooling in poolings for noise in noises]
    settings = {k: getattr(args, k) for k in ("steps", "batch", "lr", "cut", "max_position", "value_tokens",
                                              "notes_per_chunk", "pool_size", "pool_window", "tau1", "oracle_selection",
                                              "seed")}
    name = "memory_lookup" + (f"_{args.value_tokens}tokens" if args.value_tokens > 1 else "")
    name += f"_{args.tag}" if args.tag else ""
    path = write_results(name, {"settings": settings, "chance": 0.1, "rows": rows}, args.output)
    print("| pooling | note_selection_noise | accuracy beyond the cut | values whole | memory zeroed | "
          "value in pool (layers 0-3) |\n|---|---:|---:|---:|---:|---|")
    for row in rows:
        print(f"| {row['pooling']} | {row['note_selection_noise']} | {row['accuracy']:.1%} | {row['whole_values']:.1%} | "
              f"{row['accuracy_memory_zeroed']:.1%} | {' / '.join(f'{v:.0%}' for v in row['value_in_pool'])} |")
    plot(rows, args.output / f"{name}.png", args.value_tokens, args.oracle_selection)
    print(f"wrote {path} and {name}.png")
    return 0


def plot(rows: list[dict], path: Path, value_tokens: int, oracle_selection: bool) -> None:
    fig, axis = pyplot().subplots(figsize=(6, 4))
    for row in rows:
        steps = [point["step"] for point in row["curve"]]
        line, = axis.plot(steps, [point["accuracy"] for point in row["curve"]], marker="o",
                          label=f"pooling {row['pooling']}, noise {row['note_selection_noise']}")
        axis.plot(steps[-1], row["accuracy_memory_zeroed"], "x", markersize=9, color=line.get_color())
    axis.axhline(0.1, color="grey", linestyle=":", label="chance; x: memory zeroed")
    axis.set_xlabel("optimizer step (batch of 16 x 256 tokens)")
    axis.set_ylabel("value tokens answered right, beyond the cut")
    axis.legend(fontsize=7)
    what = "One-token lookup" if value_tokens == 1 else f"Lookup of {value_tokens} tokens in order"
    how = "mixer state cut, oracle selection" if oracle_selection else "mixer state cut"
    fig.suptitle(f"{what} through MemMamba's memory ({how}; CPU)", fontsize=9)
    save(fig, path)


if __name__ == "__main__":
    sys.exit(main())
