"""CPU speed and memory of the models: training step and decoding, side by side in one run.

    python -m benchmarks.bench_model [--quick] [--output benchmarks/results]

Models (d_model 256, 4 layers, vocab 32k, SSD chunk 256, 2 threads): our MemMamba, our Mamba2
(memory off), our Transformer baseline (4 heads, SwiGLU 256, about the same parameters per
layer) and transformers' ``Mamba2ForCausalLM`` built from the same Mamba2 config.

- train: forward + backward of one sequence (batch 1) at 1k, 4k and 16k tokens. The loss is
  ``model.loss.chunked_lm_loss`` on the final hidden states for every model (same code, no full
  logits tensor), so the numbers compare the networks. Best of N timed steps after one warm-up,
  and the worker process's peak RSS.
- decode: ms per token of ``step`` at positions 1k, 4k and 16k (reached by ``prefill``) and
  ``cache_nbytes`` there (transformers' model is not decoded here).

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
import tempfile
import time

JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
THREADS = 2
MODELS = ("memmamba", "mamba2", "transformer", "hf-mamba2")
DECODED = ("memmamba", "mamba2", "transformer")
FULL = dict(seq_lens=(1024, 4096, 16384), positions=(1024, 4096, 16384), train_steps=3, decode_steps=200)
QUICK = dict(seq_lens=(512, 1024), positions=(256, 1024), train_steps=1, decode_steps=10)


def bench_config(name: str):
    from model import ModelConfig

    arch = {"hf-mamba2": "mamba2"}.get(name, name)
    cfg = ModelConfig(arch=arch, vocab_size=32000, d_model=256, n_layers=4)
    cfg.mamba.chunk_size = 256
    cfg.transformer.n_heads, cfg.transformer.n_kv_heads, cfg.transformer.ffn_hidden = 4, 4, 256
    cfg.transformer.max_seq_len = max(FULL["positions"]) + 256
    return cfg


def build(name: str):
    """(model, final_hidden(ids) -> (B, L, D), head weight) for one benchmarked model."""
    from model import build_model

    cfg = bench_config(name)
    if name != "hf-mamba2":
        model = build_model(cfg)
        return model, model.final_hidden, model.lm_head.weight
    import transformers

    transformers.logging.set_verbosity_error()
    m = cfg.mamba
    model = transformers.Mamba2ForCausalLM(transformers.Mamba2Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers, state_size=m.d_state,
        head_dim=m.headdim, num_heads=cfg.n_mamba_heads, expand=m.expand, n_groups=m.ngroups, conv_kernel=m.d_conv,
        chunk_size=m.chunk_size, layer_norm_epsilon=cfg.norm_eps, tie_word_embeddings=True,
        bos_token_id=0, eos_token_id=1, pad_token_id=2))
    model.train()
    return model, lambda ids: model.backbone(ids).last_hidden_state, model.lm_head.weight


def train_worker(name: str, seq_len: int, steps: int) -> dict:
    import torch
    from model.loss import chunked_lm_loss

    model, final_hidden, head = build(name)
    ids = torch.randint(0, 32000, (1, seq_len + 1), generator=torch.Generator().manual_seed(0))

    def step() -> float:
        start = time.perf_counter()
        chunked_lm_loss(final_hidden(ids[:, :-1]), head, ids[:, 1:]).backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    step()  # warm-up
    times = [step() for _ in range(steps)]
    best = min(times)
    return dict(model=name, seq_len=seq_len, tokens_per_s=seq_len / best, ms_per_token=best / seq_len * 1e3,
                step_seconds=times, params=sum(p.numel() for p in model.parameters()),
                peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)


def decode_worker(name: str, position: int, steps: int) -> dict:
    import torch

    model, _, _ = build(name)
    model.eval()
    gen = torch.Generator().manual_seed(0)
    cache = model.allocate_cache(1)
    model.prefill(torch.randint(0, 32000, (1, position), generator=gen), cache)
    tokens = torch.randint(0, 32000, (steps + 3, 1), generator=gen)
    for token in tokens[:3]:  # warm-up
        model.step(token, cache)
    start = time.perf_counter()
    for token in tokens[3:]:
        model.step(token, cache)
    elapsed = time.perf_counter() - start
    return dict(model=name, position=position, ms_per_token=elapsed / steps * 1e3,
                cache_bytes=model.cache_nbytes(cache))


def run_worker(task: dict) -> dict:
    """Run one measurement in a fresh process (own peak RSS, allocator preloaded)."""
    env = dict(os.environ)
    if os.path.exists(JEMALLOC):
        env["LD_PRELOAD"] = JEMALLOC
    done = subprocess.run([sys.executable, "-m", "benchmarks.bench_model", "--worker", json.dumps(task)],
                          env=env, capture_output=True, text=True)
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
        for name in MODELS:
            rows = [r for r in result[kind] if r["model"] == name]
            if rows:
                ax.plot([r[x_key] for r in rows], [r[y_key] for r in rows], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel(x_key)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    setup = result["setup"]
    fig.suptitle(f"d_model 256, 4 layers, vocab 32k, {setup['threads']} threads, allocator: {setup['allocator']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_atomic(path: str, write) -> None:
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=os.path.splitext(path)[1])
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short lengths and few steps (smoke test)")
    parser.add_argument("--output", default="benchmarks/results", help="directory for model.json and model.png")
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
    tasks += [dict(kind="decode", name=n, position=p, steps=plan["decode_steps"])
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
                      f"decode: mean over {plan['decode_steps']} steps after 3",
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
    os.makedirs(args.output, exist_ok=True)
    json_path, png_path = os.path.join(args.output, "model.json"), os.path.join(args.output, "model.png")

    def dump(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(result, f, indent=2)

    write_atomic(json_path, dump)
    write_atomic(png_path, lambda tmp: plot(result, tmp))
    print(json.dumps(result["targets"], indent=2))
    print(f"wrote {json_path} and {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
