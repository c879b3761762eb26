"""Export a training run (DeepSpeed ZeRO-3 + tensor-parallel checkpoint) to a Hugging Face directory.

    python -m pretrain.export --checkpoint RUN_DIR [--tag latest|global_stepN] --output HF_DIR \\
        [--dtype fp32|bf16] [--tokenizer DIR] [--max-shard-size 5GB] [--force]

Everything runs on CPU in this one process: no GPU and no process group of the training size.
For each tensor-parallel rank, DeepSpeed's zero_to_fp32 gathers the fp32 master weights from
the ZeRO partitions of all data-parallel ranks; `model.parallel.merge_state_dicts` then joins
the TP shards (in_proj per component: z, x, B, C, dt). --checkpoint may be a run directory, its
checkpoints/ directory, one global_stepN directory, or a directory made by
`python -m pretrain.import_hf`.

The HF directory (DESIGN.md §6):

    config.json, generation_config.json
    model.safetensors            or model-0000i-of-0000n.safetensors + model.safetensors.index.json
                                 when the weights exceed --max-shard-size
    tokenizer.json, tokenizer_config.json     encode exactly like our SentencePiece model (tokenizer/hf.py)
    configuration_memmamba.py, modeling_memmamba.py and the reference files they import (MemMamba only)
    README.md                    model card: config, tokens trained, validation and evaluation figures
    SHA256SUMS                   `sha256sum -c SHA256SUMS` checks every other file

A MemMamba exports as remote code (`trust_remote_code=True`); with the memory disabled (or arch
mamba2) the model is a native `Mamba2ForCausalLM`, the Transformer baseline a native
`LlamaForCausalLM`. The directory is assembled under a temp name beside HF_DIR and renamed into
place when complete; a non-empty HF_DIR is replaced only with --force.

Exit codes: 0 done, 2 bad input (one line on stderr naming it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import yaml

from fileio import atomic_file, staged_directory
from model import ModelConfig
from model.hf.mapping import FORMATS, HFFormat, hf_config_fields, hf_state_dict
from model.parallel import FP32_PARAMETERS
from pretrain.checkpoint import Checkpoint, load_checkpoint, used_fields

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MANIFEST = "SHA256SUMS"


# ---- writing the HF directory ----

def hf_config(cfg: ModelConfig, special_ids: dict[str, int], dtype: str) -> dict[str, Any]:
    """config.json contents: the mapped fields, fixed values, special token ids, and for remote code auto_map."""
    import transformers

    model_type, fields = hf_config_fields(asdict(cfg))
    fmt = FORMATS[model_type]
    fields.update(special_ids, architectures=[fmt.architecture], dtype=str(DTYPES[dtype]).split(".")[1])
    if not fmt.remote_code:
        return getattr(transformers, fmt.native_config)(**fields).to_diff_dict()
    return {"model_type": model_type, **fields, "use_cache": True, "transformers_version": transformers.__version__,
            "auto_map": fmt.auto_map}


def hf_tensors(ckpt: Checkpoint, dtype: str) -> dict[str, torch.Tensor]:
    """The tensors of model.safetensors: tied head dropped, cast to ``dtype`` (A_log, D, dt_bias stay fp32)."""
    out = {}
    for name, tensor in hf_state_dict(ckpt.state_dict, ckpt.model.tie_embeddings).items():
        keep_fp32 = name.rsplit(".", 1)[-1] in FP32_PARAMETERS  # as in training (DESIGN.md §5)
        out[name] = tensor.to(torch.float32 if keep_fp32 else DTYPES[dtype]).contiguous()
    return out


def write_safetensors(directory: Path, tensors: dict[str, torch.Tensor], max_shard_size: int | str) -> list[str]:
    """model.safetensors, or numbered shards plus model.safetensors.index.json; returns the file names."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    split = split_torch_state_dict_into_shards(tensors, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        with atomic_file(directory / filename) as tmp:  # safetensors writes 0600 files; this applies the umask
            save_file({name: tensors[name] for name in names}, tmp, metadata={"format": "pt"})
    files = list(split.filename_to_tensors)
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": split.tensor_to_filename}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        files.append("model.safetensors.index.json")
    return files


def remote_code_files(fmt: HFFormat) -> list[Path]:
    """The modules of ``fmt.auto_map`` and every file they import relatively (found in model/hf/, then
    model/), followed with transformers' own rule, so the copy holds exactly what from_pretrained loads."""
    from transformers.dynamic_module_utils import get_relative_imports

    import model.hf

    search = [Path(model.hf.__file__).parent, Path(model.hf.__file__).parent.parent]
    found: dict[str, Path] = {}
    todo = [target.split(".")[0] for target in fmt.auto_map.values()]
    while todo:
        name = todo.pop()
        if name in found:
            continue
        candidates = [d / f"{name}.py" for d in search if (d / f"{name}.py").is_file()]
        if not candidates:
            raise RuntimeError(f"remote code: {name}.py, imported by the MemMamba HF files, is in neither of {search}")
        found[name] = candidates[0]
        todo += get_relative_imports(candidates[0])
    return sorted(found.values())


def model_card(ckpt: Checkpoint, model_type: str, parameters: int, output_name: str) -> str:
    """README.md: how to load it, what it is, how long it trained, and the figures the run recorded."""
    fmt = FORMATS[model_type]
    remote = fmt.remote_code
    meta, cfg = ckpt.meta, ckpt.model
    lines = [
        "---", "library_name: transformers", f"tags: [{model_type}, causal-lm, memmamba-pretrain]", "---", "",
        f"# {output_name}", "",
        f"{fmt.description}, {parameters:,} parameters, trained with the memmamba-pretrain pipeline "
        f"(DeepSpeed ZeRO-3 + tensor parallelism) and exported with `python -m pretrain.export`.", "",
        "## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
        # Remote code: without the flag AutoTokenizer first asks whether to run the custom config code.
        'tokenizer = AutoTokenizer.from_pretrained("PATH"' + (", trust_remote_code=True)" if remote else ")"),
        'model = AutoModelForCausalLM.from_pretrained("PATH"' + (", trust_remote_code=True)" if remote else ")"),
        'ids = tokenizer("Once upon a time", return_tensors="pt").input_ids',
        "print(tokenizer.decode(model.generate(ids, max_new_tokens=32, do_sample=False)[0]))", "```", "",
    ]
    if remote:
        lines += ["The modeling files are the project's pure-PyTorch reference network; `generate` keeps a "
                  "fixed-size recurrent cache (O(1) time and memory per token). Padding and beam search are "
                  "not supported.", ""]
    if cfg.reset_at_eod:
        lines += [f"Packed documents: the model was trained with a reset at every end-of-document token "
                  f"(id {cfg.eod_token_id}): "
                  "the token after it starts afresh, seeing nothing before it. " + (
                      "This remote code does the same, in the forward pass and in `generate`." if remote else
                      f"transformers' native `{fmt.architecture}` does not reset on packed input: "
                      "feed one document per sequence (it then equals the trained model)."), ""]
    lines += ["## Training", "",
              f"- checkpoint: `{ckpt.path.name}` (step {meta.get('step', 0)})",
              f"- tokens trained: {meta.get('tokens_seen', 0):,}"]
    if "dp" in meta and "tp" in meta:
        lines.append(f"- saved by {meta['dp']} data-parallel x {meta['tp']} tensor-parallel ranks")
    if "imported_from" in meta:
        lines.append(f"- imported from `{meta['imported_from']}`")
    data = ckpt.run_config.get("data") or {}
    sources = data.get("blend") or ([{"path": data["path"], "weight": 1}] if data.get("path") else [])
    if sources:
        lines.append("- data: " + ", ".join(f"`{s['path']}`" + (f" (weight {s['weight']:g})" if len(sources) > 1 else "")
                                            for s in sources))
    lines += ["", "## Model config", "", "```yaml", yaml.safe_dump({"model": used_fields(asdict(cfg))}, sort_keys=False).rstrip(),
              "```", ""]
    lines += _validation_section(ckpt)
    return "\n".join(lines) + "\n"


def _validation_section(ckpt: Checkpoint) -> list[str]:
    """The last validation losses logged at or before the checkpoint's step, and an evaluation summary if any."""
    run_dir = ckpt.path.parent.parent
    step = ckpt.meta.get("step", 0)
    record = None
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            entry = json.loads(line) if line.strip() else {}
            if entry.get("step", math.inf) <= step and any(k.startswith("valid/") for k in entry):
                record = entry
    lines = []
    if record is not None:
        lines += ["## Validation", "", f"Logged at step {record['step']} (`metrics.jsonl`).", "",
                  "| metric | loss | perplexity |", "|---|---|---|"]
        lines += [f"| {k} | {v:.4f} | {math.exp(v):.2f} |" for k, v in record.items() if k.startswith("valid/")]
        lines.append("")
    summary = run_dir / "eval" / ckpt.path.name / "summary.md"
    if summary.is_file():
        lines += ["## Evaluation", "", summary.read_text().strip().replace("\n# ", "\n### "), ""]
    return lines


def write_manifest(directory: Path) -> None:
    """SHA256SUMS in `sha256sum -c` format, over every file but itself."""
    lines = []
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST):
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        lines.append(f"{digest.hexdigest()}  {path.relative_to(directory)}\n")
    (directory / MANIFEST).write_text("".join(lines))


def tokenizer_dir_of(ckpt: Checkpoint, tokenizer: str | Path | None) -> Path:
    """--tokenizer, else the run config's data.tokenizer; ValueError if neither names one."""
    if tokenizer is None:
        tokenizer = (ckpt.run_config.get("data") or {}).get("tokenizer")
    if tokenizer is None:
        raise ValueError(f"--tokenizer: {ckpt.path / 'config.yaml'} sets no data.tokenizer; pass the tokenizer "
                         f"directory the training data was made with")
    return Path(tokenizer)


def write_hf_dir(directory: Path, ckpt: Checkpoint, tokenizer_dir: Path, dtype: str = "fp32",
                 max_shard_size: int | str = "5GB", name: str = "model") -> None:
    """Write every file of the HF directory into the existing, empty ``directory``."""
    import transformers

    from tokenizer import Tokenizer
    from tokenizer.hf import export_hf_tokenizer

    tok = Tokenizer(tokenizer_dir)
    if tok.vocab_size > ckpt.model.vocab_size:
        raise ValueError(f"--tokenizer {tokenizer_dir}: vocabulary of {tok.vocab_size} tokens does not fit the "
                         f"model's {ckpt.model.vocab_size} embedding rows")
    special = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
    config = hf_config(ckpt.model, special, dtype)
    # Infinity (Mamba2's time_step_limit) written as transformers writes and reads it: {"__float__": "Infinity"}.
    encoded = transformers.PreTrainedConfig._encode_special_floats(config)
    (directory / "config.json").write_text(json.dumps(encoded, indent=2, sort_keys=True) + "\n")
    transformers.GenerationConfig(**special).save_pretrained(directory)
    tensors = hf_tensors(ckpt, dtype)
    write_safetensors(directory, tensors, max_shard_size)
    fmt = FORMATS[config["model_type"]]
    if fmt.remote_code:
        for source in remote_code_files(fmt):
            shutil.copyfile(source, directory / source.name)
    export_hf_tokenizer(tokenizer_dir, directory)
    parameters = sum(t.numel() for t in tensors.values())
    (directory / "README.md").write_text(model_card(ckpt, config["model_type"], parameters, name))
    write_manifest(directory)


def export(checkpoint_path: str | Path, output: str | Path, tag: str = "latest", dtype: str = "fp32",
           tokenizer: str | Path | None = None, force: bool = False, max_shard_size: int | str = "5GB") -> Path:
    """Export one checkpoint to ``output``; returns the checkpoint directory that was exported."""
    output = Path(output)
    if dtype not in DTYPES:
        raise ValueError(f"--dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    check_output(output, force)
    ckpt = load_checkpoint(checkpoint_path, tag)
    tokenizer_dir = tokenizer_dir_of(ckpt, tokenizer)
    with staged_directory(output) as staging:
        write_hf_dir(staging, ckpt, tokenizer_dir, dtype, max_shard_size, output.name)
    return ckpt.path


def check_output(output: Path, force: bool) -> None:
    """Refuse a non-empty ``output`` unless ``force``: checked before any work, so nothing is touched."""
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not force:
        raise ValueError(f"--output {output}: exists and is not empty (pass --force to replace it)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, type=Path,
                        help="run dir, its checkpoints/ dir, a global_stepN dir, or an import_hf output")
    parser.add_argument("--tag", default="latest", help="latest | global_stepN (default: latest)")
    parser.add_argument("--output", required=True, type=Path, help="HF directory to write")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="weight dtype (default: fp32)")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer dir (default: the run config's data.tokenizer)")
    parser.add_argument("--max-shard-size", default="5GB",
                        help="split model.safetensors above this size, e.g. 5GB, 500MB (default: 5GB)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --output")
    args = parser.parse_args(argv)
    try:
        source = export(args.checkpoint, args.output, args.tag, args.dtype, args.tokenizer, args.force,
                        args.max_shard_size)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {source} -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
