"""Evaluate a trained model: perplexity by context length, passkey retrieval, memory fidelity, needle recall.

    python -m pretrain.evaluate --model runs/RUN --data DATA_DIR --tasks ppl,passkey,fidelity
    python -m pretrain.evaluate --model runs/RUN --data needles:docs=2000 --tasks recall
    python -m pretrain.evaluate --model hf/RUN --data pg19:PATH --split test --lengths 1024,4096,16384

--model is a training run directory (its newest complete checkpoint; also a checkpoints/ or
global_stepN directory), a checkpoint made by `python -m pretrain.import_hf`, or a Hugging Face
directory made by `python -m pretrain.export`
(loaded with AutoModelForCausalLM, trust_remote_code=True). --data is a directory made by
`python -m data_prep.prepare` or a source spec (pg19:PATH, jsonl:PATH, hf:NAME, synthetic:..., needles:...),
whose --split documents are tokenized with the model's tokenizer (the HF directory's own, the
run's data.tokenizer, or --tokenizer DIR). recall needs needles-format text: a needles: spec or a
dataset prepared from one.

--zero-memory evaluates a MemMamba with its memory's output zeroed (`zero_memory_output`): its
Mamba2 backbone alone, the ablation that shows what the memory retrieves. Results then go to
RUN/eval/global_stepN-zero-memory (TensorBoard: eval_zero_memory/*) and record "zero_memory": true.

Writes to --output (default: RUN/eval/global_stepN for a run, else outputs/eval/<name>):
results.json (every number, the settings and the machine), ppl.png, passkey.png,
fidelity.png, recall.png, summary.md; for a run directory also TensorBoard scalars eval/* at the
checkpoint's step in RUN/tensorboard. Metric definitions: docs/evaluation.md.
Exit codes: 0 done, 2 bad input (one line on stderr naming it).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
import typing
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from fileio import write_json_atomic, write_text_atomic
from model.kernels import BACKENDS, apply_kernels
from pretrain.checkpoint import holds_checkpoints, load_checkpoint
from pretrain.eval import TASKS, EvalLM, HFTokenizer, TaskSettings, run_tasks
from pretrain.eval.report import markdown_tables, write_plots, write_tensorboard
from pretrain.metrics import machine


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any
    """Our Tokenizer or an HFTokenizer; None when none was found (ppl on shards and fidelity still work)."""
    kind: str
    """"run" (a checkpoint of a training run), "checkpoint" (any other checkpoint directory) or "hf"."""
    name: str
    run_dir: Path | None = None
    """The training run the checkpoint belongs to (its TensorBoard receives the scalars)."""
    step: int | None = None


def load_tokenizer(directory: str | Path):
    """Our SentencePiece directory (tokenizer.model) or an HF tokenizer directory (tokenizer.json)."""
    directory = Path(directory)
    if (directory / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        # Trusted like the model: a MemMamba directory's config.json names remote code.
        return HFTokenizer(AutoTokenizer.from_pretrained(str(directory), trust_remote_code=True))
    from tokenizer import Tokenizer

    return Tokenizer(directory)


def load_run(path: Path, tokenizer_dir: str | None) -> LoadedModel:
    """Newest complete checkpoint of a run (or the given checkpoint, or a `pretrain.import_hf`
    directory), read by `pretrain.checkpoint.load_checkpoint` (ZeRO partitions gathered, TP shards merged)
    into our model."""
    from model import build_model

    ckpt = load_checkpoint(path)
    model = build_model(ckpt.model)
    model.load_state_dict(ckpt.state_dict)
    tokenizer_dir = tokenizer_dir or (ckpt.run_config.get("data") or {}).get("tokenizer")
    tokenizer = load_tokenizer(tokenizer_dir) if tokenizer_dir else None
    step = ckpt.meta.get("step")
    if ckpt.path.parent.name == "checkpoints":  # RUN/checkpoints/global_stepN
        run_dir = ckpt.path.parent.parent
        return LoadedModel(model, tokenizer, "run", run_dir.name, run_dir, step)
    return LoadedModel(model, tokenizer, "checkpoint", ckpt.path.name, None, step)


def load_hf(path: Path, tokenizer_dir: str | None) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=True, dtype=torch.float32)
    tokenizer_source = Path(tokenizer_dir) if tokenizer_dir else path
    has_tokenizer = tokenizer_dir or (path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file()
    return LoadedModel(model, load_tokenizer(tokenizer_source) if has_tokenizer else None, "hf", path.name)


def load_model(path: str | Path, tokenizer_dir: str | None = None) -> LoadedModel:
    """A run directory (or checkpoint) or an exported HF directory; ValueError naming the path otherwise."""
    path = Path(path)
    if (path / "config.json").is_file():
        return load_hf(path, tokenizer_dir)
    if holds_checkpoints(path):
        return load_run(path, tokenizer_dir)
    raise ValueError(f"--model {path}: neither a Hugging Face directory (config.json) nor a training run "
                     f"(checkpoints/ with a 'latest' pointer)")


def memory_blocks(model: nn.Module) -> list[nn.Module]:
    """The MemoryBlocks of a MemMamba: ours (model/memory.py), or the copy that an exported HF
    directory's remote code imports (a class of the same name, not the same object)."""
    return [module for module in model.modules() if type(module).__name__ == "MemoryBlock"]


@contextlib.contextmanager
def captured_pools(model: nn.Module) -> Iterator[list[tuple[nn.Module, torch.Tensor, Any]]]:
    """While open, every forward of a MemoryBlock of ``model`` appends (the block, its input: the
    mixer output y (B, L, D), its ChunkPools): what each layer's pool held, chunk by chunk."""
    captured: list[tuple[nn.Module, torch.Tensor, Any]] = []
    hooks = [block.register_forward_hook(lambda block, args, out: captured.append((block, args[0], out[1])))
             for block in memory_blocks(model)]
    try:
        yield captured
    finally:
        for hook in hooks:
            hook.remove()


@torch.no_grad()
def zero_memory_output(model: nn.Module) -> int:
    """Zero the fusion projections F_tok (``token_out``) and F_lay (``layer_out``) of every MemoryBlock;
    returns how many blocks. Both are bias-free linears and the memory's only path into the residual
    stream, so the memory then adds exactly 0: the model computes its Mamba2 backbone alone (notes are
    still written and read, their result is multiplied by zero). ValueError when there is no memory."""
    blocks = memory_blocks(model)
    if not blocks:
        raise ValueError(f"--zero-memory: the model ({type(model).__name__}) has no memory to zero "
                         f"(only a MemMamba has MemoryBlocks)")
    for block in blocks:
        block.token_out.weight.zero_()
        if block.layer_out is not None:
            block.layer_out.weight.zero_()
    return len(blocks)


def evaluate(loaded: LoadedModel, settings: TaskSettings, data: str | None, split: str, output: Path,
             device: str = "cpu", dtype: str = "float32", zero_memory: bool = False,
             kernels: str = "auto") -> dict[str, Any]:
    """Run the tasks and write results.json, the PNGs, summary.md (and TensorBoard for runs); returns the results.

    ``zero_memory``: first zero the memory's output (``zero_memory_output``, in place on ``loaded.model``).
    ``kernels``: for our checkpoints, `apply_kernels`' backend, as in training ("auto": Triton on CUDA);
    an HF directory runs its own modeling code ("hf").
    """
    if zero_memory:
        zero_memory_output(loaded.model)
    label = f"{loaded.name} (memory zeroed)" if zero_memory else loaded.name
    autocast = {"float32": None, "bfloat16": torch.bfloat16}[dtype]
    model = loaded.model.to(device)
    backend = "hf" if loaded.kind == "hf" else apply_kernels(model, kernels)
    lm = EvalLM(model, autocast_dtype=autocast)
    start = time.perf_counter()
    out = run_tasks(lm, loaded.tokenizer, settings, data, split)
    results = {"model": {"kind": loaded.kind, "name": loaded.name, "step": loaded.step, "zero_memory": zero_memory},
               "data": {"source": None if data is None else str(data), "split": split},
               "settings": asdict(settings), "device": device, "dtype": dtype, "kernels": backend, "machine": machine(),
               "seconds_total": round(time.perf_counter() - start, 3), **out}
    output.mkdir(parents=True, exist_ok=True)
    write_json_atomic(output / "results.json", results)
    write_plots({label: out["tasks"]}, output)
    title = f"# Evaluation of {label}" + (f" (step {loaded.step})" if loaded.step is not None else "")
    write_text_atomic(output / "summary.md", f"{title}\n\nData: {data} ({split}); device {device}, {dtype}.\n\n"
               + markdown_tables({label: out["tasks"]}))
    if loaded.run_dir is not None:  # the ablation beside, not on top of, the full model's curves
        write_tensorboard(loaded.run_dir / "tensorboard", out["scalars"], loaded.step,
                          prefix="eval_zero_memory" if zero_memory else "eval")
    return results


def flag(name: str) -> str:
    """The command-line flag of a TaskSettings field: ``--fidelity-d-stars`` for ``fidelity_d_stars``."""
    return "--" + name.replace("_", "-")


# How a flag's text becomes the field's value, by the field's type.
_PARSERS: dict[Any, Callable[[str], Any]] = {
    int: int, float: float, str: str,
    list[int]: lambda text: [int(x) for x in text.split(",") if x],
    list[float]: lambda text: [float(x) for x in text.split(",") if x],
    list[str]: lambda text: [x for x in text.split(",") if x],
}


def _shown(value: Any) -> str:
    """A default as one would type it: 0,0.25,1 for a list."""
    return ",".join(f"{x:g}" if isinstance(x, float) else str(x) for x in value) if isinstance(value, list) else str(value)


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TaskSettings field (every task's settings, registry.py), with the field's default and its
    help; "(default: ...)" is added unless the default is empty, whose meaning the help states."""
    defaults, hints = TaskSettings(), typing.get_type_hints(TaskSettings)
    for f in fields(TaskSettings):
        default = getattr(defaults, f.name)
        shown = f" (default: {_shown(default)})" if default != [] else ""
        parser.add_argument(flag(f.name), type=_PARSERS[hints[f.name]], default=default,
                            help=f.metadata["help"] + shown)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pretrain.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path, help="run directory, checkpoint directory or HF directory")
    *others, last = [name for name, task in TASKS.items() if task.needs_data]
    needed_by = f"{', '.join(others)} and {last}" if others else last  # "ppl, fidelity and recall"
    p.add_argument("--data", help=f"prepared dataset directory or source spec (needed by {needed_by})")
    p.add_argument("--split", default="validation", help="split of --data to read (default: validation)")
    p.add_argument("--output", type=Path, help="results directory (default: see above)")
    p.add_argument("--tokenizer", help="tokenizer directory (ours or HF), if the model does not name one")
    add_settings_flags(p)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="bfloat16 runs under autocast (parameters stay float32)")
    p.add_argument("--kernels", choices=BACKENDS, default="auto",
                   help="SSD scan and memory read of a run's checkpoint: auto (Triton on CUDA, as training), triton "
                        "(on CPU only under TRITON_INTERPRET=1), torch (the reference); default: auto")
    p.add_argument("--zero-memory", action="store_true",
                   help="zero the memory's output first: a MemMamba's backbone alone (exit 2 without memory)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = TaskSettings(**{f.name: getattr(args, f.name) for f in fields(TaskSettings)})
    try:
        settings.validate(key=flag)
        loaded = load_model(args.model, args.tokenizer)
        output = args.output
        if output is None:
            suffix = "-zero-memory" if args.zero_memory else ""
            output = (loaded.run_dir / "eval" / f"global_step{loaded.step}{suffix}" if loaded.run_dir is not None
                      else Path("outputs") / "eval" / f"{loaded.name}{suffix}")
        results = evaluate(loaded, settings, args.data, args.split, output, args.device, args.dtype,
                           args.zero_memory, args.kernels)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, value in results["scalars"].items():
        print(f"{name:>24s} {value:.4f}")
    print(f"wrote {output}/results.json, summary.md and plots in {results['seconds_total']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
