"""Pretrain a MemMamba / Mamba2 / Transformer language model with DeepSpeed ZeRO-3 and tensor parallelism.

    deepspeed [--num_gpus N] pretrain/main.py --config configs/X.yaml [--set a.b=value ...]
    torchrun --nproc_per_node N pretrain/main.py --config ...      (or srun with RANK/WORLD_SIZE/... exported)
    python pretrain/main.py --config ...                            (one process)
    python pretrain/main.py --config configs/X.yaml --dry-run --world-size 64   (parameters, memory reach, GPU memory)

Run directory (--run-dir, default runs/<config name>): config.yaml (the resolved config),
checkpoints/ (DeepSpeed tags global_stepN plus a `latest` pointer), tensorboard/, metrics.jsonl.
Settings: CLI --set > YAML file > defaults; unknown keys are errors. SIGTERM or SIGUSR1 saves a
checkpoint at the next step boundary and exits 0 (for schedulers that requeue).
Exit codes: 0 done or stopped by a signal, 1 training aborted, 2 bad input.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import warnings
from dataclasses import asdict
from pathlib import Path

if __package__ in (None, ""):  # run as a script by a launcher: import the package, not sibling files
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from data_prep.manifest import load_manifest  # noqa: E402
from data_prep.verify import check_token_ids  # noqa: E402
from pretrain import checkpoint  # noqa: E402
from pretrain.config import MemoryReachWarning, RunConfig, load_config, save_config, to_dict  # noqa: E402
from pretrain.data import RunStreams, dataset_identity, open_run_streams  # noqa: E402
from pretrain.distributed import rank_from_env, world_size_from_env  # noqa: E402


# DeepSpeed 0.19 calls torch's deprecated reduce_scatter_tensor every step; megatron-core warns about
# optional fused kernels (Transformer Engine, Apex) on import. Neither is actionable for a user.
warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
warnings.filterwarnings("ignore", category=UserWarning, module="megatron")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pretrain/main.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, type=Path, help="YAML run config (see configs/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.seed=3 (repeatable; value parsed as YAML)")
    parser.add_argument("--run-dir", type=Path, help="run directory (default: runs/<config file name>)")
    parser.add_argument("--resume", default="auto",
                        help="auto (newest complete checkpoint of the run dir, if any) | none | PATH (default: auto)")
    parser.add_argument("--init-from", type=Path, metavar="PATH",
                        help="start a fresh run from these weights (python -m pretrain.import_hf output or any "
                             "checkpoint); ignored when resuming")
    parser.add_argument("--max-steps", type=int, help="stop after this optimizer step (counted from the run's start)")
    parser.add_argument("--allow-new-data", action="store_true",
                        help="resume even though data.path holds other data than the checkpoint was trained on "
                             "(the loader's position is then meaningless: a new data order starts)")
    parser.add_argument("--dry-run", action="store_true",
                        help="build the model on the meta device, print parameters, the memory's reach and a per-GPU "
                             "memory estimate")
    parser.add_argument("--world-size", type=int, help="world size for --dry-run (default: $WORLD_SIZE or 1)")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # set by `deepspeed`
    return parser.parse_args(argv)


def check_data(cfg: RunConfig) -> RunStreams:
    """Everything about the dataset(s) that can be wrong, checked before any process group exists.

    Returns the token streams it opened to check them, for the Trainer (each shard is opened once)."""
    sources = cfg.data.sources()
    keys = [f"data.blend[{i}].path" for i in range(len(sources))] if cfg.data.blend else ["data.path"]
    manifests = [load_manifest(source.path) for source in sources]
    for key, source, manifest in zip(keys, sources, manifests):
        manifest_path = Path(source.path) / "manifest.json"
        vocab = manifest["tokenizer"]["vocab_size"]
        if vocab != cfg.model.vocab_size:
            raise ValueError(f"model.vocab_size is {cfg.model.vocab_size} but the data in {source.path} was tokenized "
                             f"with a {vocab}-token vocabulary ({manifest_path})")
        eod = manifest["tokenizer"].get("eod_id")
        if cfg.model.reset_at_eod and eod is not None and eod != cfg.model.eod_token_id:
            raise ValueError(f"model.eod_token_id is {cfg.model.eod_token_id} but the documents in {source.path} end "
                             f"with token {eod} ({manifest_path}); set model.eod_token_id: {eod}")
        if manifest["tokenizer"]["sha256"] != manifests[0]["tokenizer"]["sha256"]:
            raise ValueError(f"{key}: {source.path} was made with another tokenizer than {keys[0]} "
                             f"(sha256 {manifest['tokenizer']['sha256'][:12]} != "
                             f"{manifests[0]['tokenizer']['sha256'][:12]}); a blend needs one tokenizer")
    if cfg.data.tokenizer is not None:
        from tokenizer import Tokenizer

        tok = Tokenizer(cfg.data.tokenizer)
        if tok.sha256 != manifests[0]["tokenizer"]["sha256"]:
            raise ValueError(f"data.tokenizer: {cfg.data.tokenizer} is not the tokenizer {sources[0].path} was "
                             f"made with (sha256 {tok.sha256[:12]} != {manifests[0]['tokenizer']['sha256'][:12]})")
    longest = max(stage.seq_len for stage in cfg.curriculum.stages)
    streams = open_run_streams(cfg.data)
    valid_shards = []
    for source, train, valid in zip(sources, streams.train, streams.valid):
        for shard in train.shards + valid.shards:  # an id past the embedding fails mid-training on one rank only
            check_token_ids(shard, cfg.model.vocab_size)
        if train.total_tokens < longest + 1:
            raise ValueError(f"data.train_split: {cfg.data.train_split} of {source.path} holds {train.total_tokens} "
                             f"tokens, fewer than one sample of the longest curriculum length ({longest} + 1)")
        valid_shards += valid.shards
    valid_tokens = sum(shard.num_tokens for shard in valid_shards)
    where = " + ".join(source.path for source in sources)
    for seq_len in cfg.eval.seq_lens:
        if cfg.eval.samples * seq_len + 1 > valid_tokens:
            raise ValueError(f"eval.samples: {cfg.eval.samples} samples of {seq_len} tokens need "
                             f"{cfg.eval.samples * seq_len + 1} tokens, the {cfg.data.valid_split} split of "
                             f"{where} holds {valid_tokens}")
    return streams


def load_checked_config(args: argparse.Namespace, world_size: int) -> RunConfig:
    """Load and validate; a length beyond a FIFO memory pool's reach prints one `warning:` line (rank 0)."""
    cfg = load_config(RunConfig, args.config, args.set)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MemoryReachWarning)
        try:
            cfg.validate(world_size)
        except ValueError as e:
            overridden = [o for o in args.set if f"{o.partition('=')[0].strip()}:" in str(e)]
            where = f"{args.config} with --set {', --set '.join(overridden)}" if overridden else str(args.config)
            raise ValueError(f"{where}: {e}") from None
    for w in caught:
        if issubclass(w.category, MemoryReachWarning):
            if rank_from_env() == 0:
                print(f"warning: {w.message}", file=sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    return cfg


def prepare(args: argparse.Namespace) -> tuple[RunConfig, Path, checkpoint.ResumePoint | None, RunStreams]:
    """Load and check everything; raises ValueError with a one-line message for any bad input."""
    if args.max_steps is not None and args.max_steps < 1:
        raise ValueError(f"--max-steps: expected >= 1, got {args.max_steps}")
    cfg = load_checked_config(args, world_size_from_env())
    if cfg.logging.wandb.project and importlib.util.find_spec("wandb") is None:
        raise ValueError("logging.wandb.project: set, but wandb is not installed (pip install -e '.[wandb]')")
    streams = check_data(cfg)
    run_dir = args.run_dir or Path("runs") / args.config.stem
    resume = checkpoint.find_resume_point(args.resume, run_dir / "checkpoints")
    if resume is not None:
        checkpoint.check_compatible(resume, to_dict(cfg.model), cfg.data.seed)
        if not args.allow_new_data:
            checkpoint.check_same_data(resume, [asdict(s) for s in cfg.data.sources()], dataset_identity(cfg.data))
    return cfg, run_dir, resume, streams


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    is_main = rank_from_env() == 0
    try:
        if args.dry_run:
            from pretrain.estimate import report

            world_size = args.world_size or world_size_from_env()
            print(report(load_checked_config(args, world_size), world_size))
            return 0
        cfg, run_dir, resume, streams = prepare(args)
    except ValueError as e:
        if is_main:
            print(f"error: {e}", file=sys.stderr)
        return 2

    import torch

    from pretrain.distributed import init_distributed
    from pretrain.trainer import Trainer, TrainingAborted

    env = init_distributed(cfg.parallel.tp)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        if resume is not None and resume.passed_over:
            checkpoint.rewind_latest(resume)
            print(f"--resume auto: passing over {', '.join(resume.passed_over)} (saved during a non-finite streak, "
                  f"removed); resuming from {resume.tag}, the newest healthy checkpoint")
        for leftover in checkpoint.remove_incomplete(run_dir / "checkpoints"):
            print(f"removed {leftover} (newer than the checkpoint resumed from: an interrupted save, or unhealthy)")
        print(f"run dir {run_dir}: world {env.world_size} = tp {env.tp} x dp {env.dp}, "
              + (f"resuming from {resume.path} (step {resume.meta['step']})" if resume else "starting fresh"))
    torch.distributed.barrier()
    try:
        trainer = Trainer(cfg, run_dir, env, resume, args.init_from, streams)
    except ValueError as e:  # --init-from weights of another model, an unreadable checkpoint
        if env.is_main:
            print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        result = trainer.train(args.max_steps)
    except TrainingAborted as e:
        if env.is_main:
            print(f"error: {e}", file=sys.stderr)
        return 1
    if env.is_main and not result["stopped"]:
        valid = ", ".join(f"{k} {v:.4f}" for k, v in result.items() if k.startswith("valid/"))
        loss = "n/a" if result["loss"] is None else f"{result['loss']:.4f}"
        print(f"done: step {result['step']}, {result['tokens']:,} tokens, final loss {loss}, {valid}")
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
