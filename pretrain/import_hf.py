"""Import a Hugging Face model as a checkpoint that training can start from (e.g. upcycle Mamba2 -> MemMamba).

    python -m pretrain.import_hf --input HF_DIR --output CKPT_DIR [--tp N] [--memory-config FILE] \\
        [--seed S] [--force]

Reads config.json and the safetensors weights (one file or an index of shards) of a
`Mamba2ForCausalLM` (model_type mamba2), a MemMamba exported by `python -m pretrain.export`
(memmamba) or a `LlamaForCausalLM` (llama). No model code runs (no trust_remote_code): config
fields are translated with the table in model/hf/mapping.py, and a field our network does not
implement (a conv bias off, a dt clamp, ...) is an error naming it.

--memory-config FILE upcycles a Mamba2 into a MemMamba. FILE is YAML holding model.memory fields
(`pool_size: 50`, ...; an empty file takes the defaults), or a whole run config whose
model.memory is used. The memory parameters are initialised fresh (seeded by --seed) with zero
fusion projections, so the upcycled model computes exactly what the Mamba2 computed until
training moves them.

CKPT_DIR has the layout of a checkpoint without ZeRO partitions, cut for --tp ranks:

    config.yaml                   {"model": ...}: the ModelConfig, as a run config's model section
    meta.json                     step 0, tokens_seen 0, tp, dp 1, imported_from
    mp_rank_XX_model_states.pt    {"module": state dict of TP rank XX}, XX < tp

`pretrain.checkpoint.load_checkpoint(CKPT_DIR)` reads it back (full weights, any TP), so
`python -m pretrain.export --checkpoint CKPT_DIR` exports it and `pretrain/main.py --init-from
CKPT_DIR` starts a run from its weights (fresh optimizer, step 0, the run's own curriculum).

Exit codes: 0 done, 2 bad input (one line on stderr naming it).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import yaml

from fileio import read_json, staged_directory
from model import ModelConfig, build_model
from model.config import MemoryConfig
from model.hf.mapping import model_config_fields, our_state_dict
from model.parallel import shard_state_dict
from pretrain.checkpoint import MODEL_STATES, check_weights, load_checkpoint, model_differences, write_record
from pretrain.config import from_dict
from pretrain.export import check_output


def read_hf_dir(directory: Path) -> tuple[str, dict[str, Any], dict[str, torch.Tensor]]:
    """(model_type, config.json contents, tensors by name) of an HF model directory."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ValueError(f"--input {directory}: no config.json (expected a Hugging Face model directory)")
    from transformers import PreTrainedConfig

    read_json(config_path)  # a one-line error naming the file, where transformers raises a paragraph
    config, _ = PreTrainedConfig.get_config_dict(str(directory))  # decodes {"__float__": "Infinity"} too
    single, index = directory / "model.safetensors", directory / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        files = [directory / name for name in sorted(set(read_json(index)["weight_map"].values()))]
    else:
        raise ValueError(f"--input {directory}: no model.safetensors or model.safetensors.index.json "
                         f"(only safetensors weights are read)")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        if not file.is_file():
            raise ValueError(f"--input {directory}: {file.name}, listed in {index.name}, is missing")
        try:
            tensors.update(load_file(file))
        except SafetensorError as e:
            raise ValueError(f"{file}: unreadable safetensors file (truncated or corrupt? {e})") from None
    return config.get("model_type", "<missing>"), config, tensors


def memory_config(path: Path) -> MemoryConfig:
    """--memory-config: a YAML of MemoryConfig fields, or a run config whose model.memory is taken."""
    if not path.is_file():
        raise ValueError(f"--memory-config {path}: no such file")
    data = yaml.safe_load(path.read_text()) or {}
    source = str(path)
    if isinstance(data, dict) and "model" in data:
        data, source = (data["model"] or {}).get("memory") or {}, f"{path}: model.memory"
    return from_dict(MemoryConfig, data, source, "memory.")


def imported_model_config(model_type: str, hf_config: dict[str, Any], source: str,
                          memory: MemoryConfig | None) -> ModelConfig:
    """Our ModelConfig for an HF config (+ a memory config when upcycling); validated."""
    fields = model_config_fields(model_type, hf_config, source)
    if "eod_token_id" not in fields and isinstance(hf_config.get("eos_token_id"), int):
        fields["eod_token_id"] = hf_config["eos_token_id"]  # native formats: the document reset's EOD is their eos
    if memory is not None:
        if model_type != "mamba2":
            raise ValueError(f"--memory-config: only a Mamba2 model can be upcycled, {source} is a {model_type}")
        fields.update(arch="memmamba", memory={**asdict(memory), "enabled": True})
    cfg = from_dict(ModelConfig, fields, source)
    try:
        cfg.validate()
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    return cfg


def imported_state_dict(cfg: ModelConfig, model_type: str, tensors: dict[str, torch.Tensor], source: str,
                        seed: int) -> dict[str, torch.Tensor]:
    """Full float32 state dict: the HF tensors, plus freshly initialised memory parameters when upcycling."""
    torch.manual_seed(seed)
    state = build_model(cfg).state_dict()  # the init of everything the HF model does not have
    upcycled = cfg.memory_enabled and model_type == "mamba2"
    given = our_state_dict(tensors, model_type, cfg.tie_embeddings)
    check_weights(given, state, source, "its config", may_lack=lambda name: upcycled and ".memory." in name)
    state.update({name: tensor.to(torch.float32) for name, tensor in given.items()})
    return state


def write_checkpoint(directory: Path, cfg: ModelConfig, state: dict[str, torch.Tensor], tp: int,
                     meta: dict[str, Any]) -> None:
    """Write the import layout (module docstring) for ``tp`` ranks into the empty ``directory``."""
    try:
        shards = [shard_state_dict(state, cfg, tp, rank) for rank in range(tp)]
    except ValueError as e:
        raise ValueError(f"--tp {tp}: {e}") from None
    for rank, shard in enumerate(shards):
        # clone: a shard may be a view, and torch.save would write the whole underlying tensor
        torch.save({"module": {k: v.clone() for k, v in shard.items()}}, directory / MODEL_STATES.format(rank))
    write_record(directory, {"model": asdict(cfg)},
                 {"step": 0, "tokens_seen": 0, "world_size": tp, "dp": 1, "tp": tp, **meta})


def import_hf(input_dir: str | Path, output: str | Path, tp: int = 1, memory_config_path: str | Path | None = None,
              seed: int = 0, force: bool = False) -> ModelConfig:
    """Import ``input_dir`` into the checkpoint directory ``output``; returns the model config written."""
    input_dir, output = Path(input_dir), Path(output)
    check_output(output, force)
    if tp < 1:
        raise ValueError(f"--tp: must be >= 1, got {tp}")
    memory = memory_config(Path(memory_config_path)) if memory_config_path is not None else None
    model_type, hf_config, tensors = read_hf_dir(input_dir)
    source = str(input_dir / "config.json")
    cfg = imported_model_config(model_type, hf_config, source, memory)
    state = imported_state_dict(cfg, model_type, tensors, str(input_dir), seed)
    with staged_directory(output) as staging:
        write_checkpoint(staging, cfg, state, tp, {"imported_from": str(input_dir), "import_seed": seed})
    return cfg


def init_from(model: torch.nn.Module, path: str | Path) -> None:
    """Load the weights of a checkpoint (this module's output, or any training checkpoint, at any
    TP/DP layout) into ``model``, a freshly built TP=1 model of the same ModelConfig; for
    `pretrain/main.py --init-from PATH`, before tensor parallelism shards the model.

    Raises ValueError naming every model field that differs between the run and the checkpoint.
    """
    source = load_checkpoint(path)
    differences = [f"model.{key} {theirs!r} (run: {ours!r})"
                   for key, theirs, ours in model_differences(asdict(source.model), asdict(model.config))]
    if differences:
        raise ValueError(f"--init-from {path}: checkpoint {source.path} has another model: {'; '.join(differences)}")
    model.load_state_dict(source.state_dict, strict=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.import_hf", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, type=Path, help="HF model directory (config.json + safetensors)")
    parser.add_argument("--output", required=True, type=Path, help="checkpoint directory to write")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks to cut the weights for (default: 1)")
    parser.add_argument("--memory-config", type=Path,
                        help="upcycle a Mamba2 into a MemMamba with this memory (YAML of model.memory fields)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the new memory parameters (default: 0)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --output")
    args = parser.parse_args(argv)
    try:
        cfg = import_hf(args.input, args.output, args.tp, args.memory_config, args.seed, args.force)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"imported {args.input} -> {args.output} (arch {cfg.arch}, tp {args.tp})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
