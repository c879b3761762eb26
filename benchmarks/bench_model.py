"""CPU speed and memory of the models: training step and decoding, side by side in one run.

    python -m benchmarks.bench_model [--quick] [--output benchmarks/results]

Models (d_model 256, 4 layers, vocab 32k, SSD chunk 256, 2 threads): our MemMamba, our Mamba2
(memory off), our Transformer baseline (4 heads, SwiGLU 256, about the same parameters per
layer), and transformers' ``Mamba2ForCausalLM`` and ``LlamaForCausalLM`` built from the same
configs through the export's mapping table (model/hf/mapping.py).

- train: forward + backward of one sequence (batch 1) at 1k, 4k and 16k tokens. The loss is
  ``model.loss.chunked_lm_loss`` on the final hidden states for every model (same code, no full
  logits tensor), so the numbers compare the networks. Best of N timed steps after one warm-up,
  and the worker process's peak RSS.
- decode: ms per token of ``step`` from positions 1k, 4k and 16k (reached by ``prefill``): the best
  of 3 means over 256 consecutive tokens (a whole chunk, so each mean includes one chunk end),
  and the cache's bytes; for transformers' models one ``forward`` per token with their own cache
  (``cache_params`` / ``past_key_values``), as ``generate`` does it.

Every measurement runs in its own subprocess (clean peak RSS), with jemalloc preloaded when
/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 exists (DESIGN.md §8); the allocator is recorded.
Writes <output>/model.json and <output>/model.png.
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from benchmarks.common import RESULTS, write_results
from model.hf.mapping import FORMATS, hf_config_fields

JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
THREADS = 2
EOD = 2  # model.eod_token_id's default; the plain runs feed one document (no EOD) per sequence
MODELS = ("memmamba", "mamba2", "transformer", "hf-mamba2")
DECODED = ("memmamba", "mamba2", "transformer", "hf-mamba2", "hf-llama")
HF_NATIVE = {f"hf-{fmt.model_type}": fmt for fmt in FORMATS.values() if not fmt.remote_code}
"""transformers' own classes benchmarked beside ours (hf-mamba2, hf-llama), built from the export's records."""
FULL = dict(seq_lens=(1024, 4096, 16384), positions=(1024, 4096, 16384), train_steps=3, decode_steps=256, decode_repeats=3)
QUICK = dict(seq_lens=(512, 1024), positions=(256, 1024), train_steps=1, decode_steps=10, decode_repeats=1)


def bench_config(name: str):
    from model import ModelConfig

    arch = HF_NATIVE[name].arch if name in HF_NATIVE else name
    cfg = ModelConfig(arch=arch, vocab_size=32000, d_model=256, n_layers=4)
    cfg.mamba.chunk_size = 256
    cfg.transformer.n_heads, cfg.transformer.n_kv_heads, cfg.transformer.ffn_hidden = 4, 4, 256
    cfg.transformer.max_seq_len = max(FULL["positions"]) + 3 + FULL["decode_repeats"] * FULL["decode_steps"]
    return cfg


def build(name: str, reset_at_eod: bool = True):
    """(model, final_hidden(ids) -> (B, L, D), head weight) for one benchmarked model."""
    from model import build_model

    cfg = bench_config(name)
    cfg.reset_at_eod = reset_at_eod
    if name not in HF_NATIVE:
        model = build_model(cfg)
        return model, model.final_hidden, model.lm_head.weight
    import transformers
    transformers.logging.set_verbosity_error()
    model_type, fields = hf_config_fields(asdict(cfg))
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(model_type, **fields))
    model.train()
    return model, lambda ids: model.base_model(ids).last_hidden_state, model.lm_head.weight


def token_ids(length: int, gen, doc_length: int | None = None):
    """(1, length) random ids: one document (no EOD), or documents of ``doc_length`` tokens ending in EOD."""
    import torch

    ids = torch.randint(EOD + 1, 32000, (1, length), generator=gen)
    if doc_length:
        ids[:, doc_length - 1::doc_length] = EOD
    return ids


def train_worker(name: str, seq_len: int, steps: int, doc_length: int | None = None, reset_at_eod: bool = True) -> dict:
    import torch
    from model.loss import chunked_lm_loss

    model, final_hidden, head = build(name, reset_at_eod)
    ids = token_ids(seq_len + 1, torch.Generator().manual_seed(0), doc_length)

    def step() -> float:
        start = time.perf_counter()
        chunked_lm_loss(final_hidden(ids[:, :-1]), head, ids[:, 1:]).backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    step()  # warm-up
    times = [step() for _ in range(steps)]
    best = min(times)
    return dict(model=name, seq_len=seq_len, doc_length=doc_length, reset_at_eod=reset_at_eod,
                tokens_per_s=seq_len / best, ms_per_token=best / seq_len * 1e3,
                step_seconds=times, params=sum(p.numel() for p in model.parameters()),
                peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)


def decode_worker(name: str, position: int, steps: int, repeats: int, doc_length: int | None = None,
                  reset_at_eod: bool = True) -> dict:
    import torch

    model, _, _ = build(name, reset_at_eod)
    model.eval()
    prefill, step, cache_bytes = decoder(name, model)
    gen = torch.Generator().manual_seed(0)
    cache = prefill(token_ids(position, gen, doc_length))
    tokens = token_ids(3 + repeats * steps, gen).view(-1, 1)
    if doc_length:  # one document ends in the middle of each timed run
        tokens[3 + steps // 2::steps] = EOD
    means = []
    with torch.no_grad():
        for token in tokens[:3]:  # warm-up
            cache = step(token, cache)
        for run in tokens[3:].split(steps):
            start = time.perf_counter()
            for token in run:
                cache = step(token, cache)
            means.append((time.perf_counter() - start) / steps)
    return dict(model=name, position=position, doc_length=doc_length, reset_at_eod=reset_at_eod,
                ms_per_token=min(means) * 1e3, ms_per_token_runs=[m * 1e3 for m in means],
                cache_bytes=cache_bytes(cache))


def decoder(name: str, model):
    """(prefill(ids) -> cache, step(token (1,), cache) -> cache, cache_bytes(cache)) of one model."""
    import torch

    if name not in HF_NATIVE:
        def prefill(ids):
            cache = model.allocate_cache(1)
            model.prefill(ids, cache)
            return cache

        def step(token, cache):
            model.step(token, cache)  # updates the cache in place
            return cache

        return prefill, step, model.cache_nbytes

    cache_arg = HF_NATIVE[name].cache_argument

    @torch.no_grad()
    def forward(ids, cache=None):
        out = model(ids, use_cache=True, **({cache_arg: cache} if cache is not None else {}))
        return getattr(out, cache_arg)

    def tensors(obj, seen):
        """Every tensor reachable from a cache object (its layers, lists, dicts), once."""
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            yield obj
        elif isinstance(obj, (list, tuple, dict)):
            for item in obj.values() if isinstance(obj, dict) else obj:
                yield from tensors(item, seen)
        elif hasattr(obj, "__dict__") and not isinstance(obj, torch.nn.Module):
            yield from tensors(vars(obj), seen)

    return (forward, lambda token, cache: forward(token.view(1, 1), cache),
            lambda cache: sum(t.numel() * t.element_size() for t in tensors(cache, set())))


def run_worker(task: dict, module: str = "benchmarks.bench_model") -> dict:
    """Run one measurement (``python -m MODULE --worker TASK``) in a fresh process (own peak RSS,
    allocator preloaded); its last stdout line is the JSON result."""
    env = dict(os.environ)
    if os.path.exists(JEMALLOC):
        env["LD_PRELOAD"] = JEMALLOC
    done = subprocess.run([sys.executable, "-m", module, "--worker", json.dumps(task)],
                          cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark worker {task} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarize(train: list[dict], decode: list[dict], seq_lens, positions) -> dict:
    """The issue's targets, evaluated on the measured numbers (pass or fail)."""
    t = {(r["model"], r["seq_len"]): r for r in train}
    d = {(r["model"], r["position"]): r for r in decode}
    short, long = seq_lens[0], seq_lens[-1]
    speedup = {n: t["mamba2", n]["tokens_per_s"] / t["hf-mamba2", n]["tokens_per_s"] for n in seq_lens}
    growth = t["memmamba", long]["ms_per_token"] / t["memmamba", short]["ms_per_token"]
    overhead = {n: t["memmamba", n]["ms_per_token"] / t["mamba2", n]["ms_per_token"] for n in seq_lens}
    memmamba_decode = [d["memmamba", p]["ms_per_token"] for p in positions]
    return {
        "mamba2_vs_hf_speedup": speedup,
        "mamba2_vs_hf_speedup>=1.5": all(v >= 1.5 for v in speedup.values()),
        f"memmamba_ms_per_token_{long}/{short}": growth,
        f"memmamba_ms_per_token_{long}/{short}<=1.2": growth <= 1.2,
        f"memmamba_peak_rss_gb_{long}": t["memmamba", long]["peak_rss_gb"],
        f"memmamba_peak_rss_gb_{long}<=3.5": t["memmamba", long]["peak_rss_gb"] <= 3.5,
        "memmamba_vs_mamba2_step": overhead,
        "memmamba_vs_mamba2_step<=1.3": all(v <= 1.3 for v in overhead.values()),
        "memmamba_decode_ms_per_token": memmamba_decode,
        "memmamba_decode<=2.5": max(memmamba_decode) <= 2.5,
        "memmamba_decode_flat(max/min<=1.2)": max(memmamba_decode) / min(memmamba_decode) <= 1.2,
        "cache_bytes_flat_for_mamba": all(len({d[m, p]["cache_bytes"] for p in positions}) == 1
                                          for m in ("memmamba", "mamba2")),
    }


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    panels = [("train", "seq_len", "tokens_per_s", "training tokens/s (fwd+bwd)"),
              ("train", "seq_len", "peak_rss_gb", "peak RSS (GB)"),
              ("decode", "position", "ms_per_token", "decode ms/token")]
    for ax, (kind, x_key, y_key, title) in zip(axes, panels):
        for name in dict.fromkeys(MODELS + DECODED):
            rows = [r for r in result[kind] if r["model"] == name]
            if rows:
                ax.plot([r[x_key] for r in rows], [r[y_key] for r in rows], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel(x_key)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    axes[2].legend()  # decode also shows transformers' Llama
    setup = result["setup"]
    fig.suptitle(f"d_model 256, 4 layers, vocab 32k, {setup['threads']} threads, allocator: {setup['allocator']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short lengths and few steps (smoke test)")
    parser.add_argument("--output", type=Path, default=RESULTS, help="directory for model.json and model.png")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        import torch

        torch.set_num_threads(THREADS)
        task = json.loads(args.worker)
        kind = task.pop("kind")
        print(json.dumps(train_worker(**task) if kind == "train" else decode_worker(**task)))
        return 0

    from tqdm import tqdm

    plan = QUICK if args.quick else FULL
    tasks = [dict(kind="train", name=n, seq_len=s, steps=plan["train_steps"])
             for s in plan["seq_lens"] for n in MODELS]
    tasks += [dict(kind="decode", name=n, position=p, steps=plan["decode_steps"], repeats=plan["decode_repeats"])
              for p in plan["positions"] for n in DECODED]
    train, decode = [], []
    for task in tqdm(tasks, desc="bench_model"):
        (train if task["kind"] == "train" else decode).append(run_worker(task))

    import torch
    import transformers

    result = {
        "setup": {
            "config": "d_model 256, n_layers 4, vocab 32000, mamba d_state 64 headdim 64 expand 2 ngroups 1 "
                      "chunk 256; memory defaults (pool 50, 4 notes/chunk, summary 64, 4 heads, cross-layer "
                      "every 4); transformer 4 heads, SwiGLU 256",
            "threads": THREADS,
            "allocator": f"jemalloc (LD_PRELOAD={JEMALLOC})" if os.path.exists(JEMALLOC) else "glibc malloc",
            "loss": "model.loss.chunked_lm_loss on final hidden states (1024-token slices), same for all models",
            "timing": f"train: best of {plan['train_steps']} steps after 1 warm-up; "
                      f"decode: best of {plan['decode_repeats']} means over {plan['decode_steps']} consecutive "
                      "tokens after 3 warm-up tokens",
            "batch": 1,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "cpu": platform.processor() or platform.machine(),
            "load_average_at_end": os.getloadavg(),
            "quick": args.quick,
        },
        "train": train,
        "decode": decode,
    }
    result["targets"] = summarize(train, decode, plan["seq_lens"], plan["positions"])
    json_path = write_results("model", result, args.output)
    png_path = json_path.with_suffix(".png")
    plot(result, png_path)
    print(json.dumps(result["targets"], indent=2))
    print(f"wrote {json_path} and {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
