"""The training loop: ZeRO-3 (+ megatron-core TP) with curriculum, token-driven LR, exact resume.

`Trainer(cfg, run_dir, env, resume_point).train()` runs until train.max_tokens (or --max-steps),
saving a checkpoint every checkpoint.every_steps steps, at the end, and when SIGTERM/SIGUSR1
asks for it. Everything a resume needs (loader cursor, tokens seen, step, skipped-step counts,
RNG states) travels in the checkpoint's client state; see pretrain/checkpoint.py.
"""

from __future__ import annotations

import fnmatch
import math
import os
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import deepspeed
import numpy as np
import torch
from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO

from model import build_model
from model.kernels import apply_kernels
from model.parallel import parallelize

from . import checkpoint
from .config import RunConfig, config_hash, to_dict
from .data import (RunStreams, TokenStream, TrainLoader, dataset_identity, open_run_streams, source_names,
                   validation_batch)
from .distributed import DistEnv, seed_everything
from .flops import achieved_tflops, mfu, model_flops_per_token, peak_flops_per_second
from .metrics import MetricsLogger, memory_gb
from .schedule import StepShape, learning_rate, step_shape

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class TrainingAborted(RuntimeError):
    """Training cannot go on (e.g. too many consecutive non-finite steps); checkpoints are left as they were."""


@dataclass
class Progress:
    """Counters that survive a restart (saved in every checkpoint's client state)."""

    step: int = 0
    tokens_seen: int = 0
    skipped_steps: int = 0
    consecutive_skips: int = 0


@dataclass
class StepResult:
    shape: StepShape
    loss: float
    grad_norm: float
    lr: float
    seconds: float


class StopRequest:
    """Remembers SIGTERM/SIGUSR1 so the loop can checkpoint at the next step boundary and exit 0.

    The `deepspeed` command forwards no signal: SIGTERM to it alone (a job manager's, or
    `kill`) ends it at once and leaves its per-node launcher and the ranks training. So a rank
    launched by it also stops when that command is gone, as if it had been signalled.
    """

    def __init__(self):
        self.signal_name: str | None = None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)
        self._node_launcher, self._deepspeed_command = _deepspeed_launchers()

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal_name = signal.Signals(signum).name

    def _deepspeed_command_exited(self) -> bool:
        import psutil

        if self._node_launcher is None:
            return False
        try:  # the node launcher is re-parented the moment the command exits, reaped or not
            return self._node_launcher.ppid() != self._deepspeed_command
        except psutil.NoSuchProcess:
            return True

    def agreed(self) -> bool:
        """Collective: True on every rank if any rank was signalled (the scheduler may reach only some)."""
        if self.signal_name is None and self._deepspeed_command_exited():
            self.signal_name = "the deepspeed command exited"
        flag = torch.tensor([1.0 if self.signal_name else 0.0])
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())


def _deepspeed_launchers() -> tuple[Any, int | None]:
    """(this rank's parent, the pid of the `deepspeed` command above it) when DeepSpeed's per-node
    launcher started this process, else (None, None)."""
    import psutil

    try:
        parent = psutil.Process(os.getppid())
        if "deepspeed.launcher.launch" not in " ".join(parent.cmdline()):
            return None, None
        return parent, parent.ppid()
    except psutil.Error:
        return None, None


ALL_PARAMETERS = 2**62
"""A ZeRO-3 persistence threshold above any parameter's size."""


def deepspeed_config(cfg: RunConfig, dp: int, device: torch.device, load_universal: bool) -> dict[str, Any]:
    """DeepSpeed's JSON config, derived from the typed run config (the YAML never holds raw DeepSpeed keys).

    bf16 runs through `torch_autocast`: parameters stay fp32 (so A_log, D and dt_bias do, as
    DESIGN.md §5 requires) and matmuls run in bf16.
    """
    t, d = cfg.train, cfg.deepspeed
    micro = t.micro_batch_size
    zero: dict[str, Any] = {"stage": d.zero_stage}
    if d.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if d.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    threshold = d.param_persistence_threshold
    if d.zero_stage == 3 and (threshold is not None or dp == 1):
        zero["stage3_param_persistence_threshold"] = ALL_PARAMETERS if threshold is None else threshold
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": t.global_batch_size // (micro * dp),
        "train_batch_size": t.global_batch_size,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "torch_autocast": {"enabled": use_bf16(cfg, device), "dtype": "bfloat16"},
        "checkpoint": {"load_universal": load_universal},
        "steps_per_print": 2**62,  # our own logging replaces DeepSpeed's
        "zero_allow_untested_optimizer": True,
    }


def use_bf16(cfg: RunConfig, device: torch.device) -> bool:
    if cfg.deepspeed.precision == "auto":
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    return cfg.deepspeed.precision == "bf16"


EMBEDDING_NAMES = ("embeddings.weight", "embed_tokens.weight", "lm_head.weight")
"""Suffixes of the token embedding and the LM head (ours, and the Transformer's Llama names)."""


def parameter_groups(model: torch.nn.Module, weight_decay: float, decay_embeddings: bool = True,
                     memory_lr_scale: float = 1.0) -> list[dict[str, Any]]:
    """Weight decay on matrices only: norms, biases and the SSM's A_log, D, dt_bias (all 1-D) get none,
    nor do the embedding and the LM head unless ``decay_embeddings``. Each group's ``lr_scale``
    multiplies the schedule's learning rate: ``memory_lr_scale`` for the memory's parameters (their
    own groups only when it is not 1, so the optimizer state of a run without it keeps its layout)."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # a tied weight once

    def decayed(name: str, param: torch.Tensor) -> bool:
        return param.ndim >= 2 and (decay_embeddings or not name.endswith(EMBEDDING_NAMES))

    def scale(name: str) -> float:
        return memory_lr_scale if ".memory." in name else 1.0

    def group(lr_scale: float, decay: bool) -> dict[str, Any]:
        return {"params": [p for n, p in trainable if scale(n) == lr_scale and decayed(n, p) == decay],
                "weight_decay": weight_decay if decay else 0.0, "lr_scale": lr_scale}

    groups = [group(1.0, True), group(1.0, False)]
    if memory_lr_scale != 1.0:  # a model without a memory gets no empty groups
        groups += [g for g in (group(memory_lr_scale, True), group(memory_lr_scale, False)) if g["params"]]
    return groups


def freeze_parameters(model: torch.nn.Module, patterns: list[str]) -> None:
    """``train.freeze``: parameters whose name matches one of the glob patterns stop requiring grad,
    so the optimizer never sees them (parameter_groups keeps trainable ones only)."""
    names = [name for name, _ in model.named_parameters()]
    for pattern in patterns:
        if not fnmatch.filter(names, pattern):
            raise ValueError(f"train.freeze: pattern {pattern!r} matches no parameter of this model "
                             f"(names look like {names[1]!r})")
    for name, param in model.named_parameters():
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns):
            param.requires_grad_(False)


def build_optimizer(model: torch.nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    """AdamW; DeepSpeed's CPU Adam when the optimizer step is offloaded to the CPU (ZeRO-Offload needs it).

    torch's fused AdamW (one pass over each tensor) on CPU and CUDA: ZeRO hands the optimizer a few
    flat fp32 partitions, over which the default implementation's dozen elementwise passes took
    0.14 s per step for 10.6M parameters on 2 cores, against 0.01 s fused (benchmarks.bench_train's model).
    """
    o = cfg.optimizer
    groups = parameter_groups(model, o.weight_decay, o.decay_embeddings, o.memory_lr_scale)
    if cfg.deepspeed.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, adamw_mode=True)
    fused = next(model.parameters()).device.type in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=fused)


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute every block in the backward pass; parameter names stay unchanged.

    List arguments are copied when the block runs: MemMamba passes each block the list of earlier
    layers' pools and appends to it afterwards, and the recomputation must see the list as it was.
    """
    from torch.utils.checkpoint import checkpoint as recompute

    def checkpointed(forward):
        def run(*args, **kwargs):
            args = [list(a) if isinstance(a, list) else a for a in args]
            return recompute(forward, *args, use_reentrant=False, **kwargs)

        return run

    for name, blocks in model.named_modules():
        if name.endswith("layers") and isinstance(blocks, torch.nn.ModuleList):
            for block in blocks:
                block.forward = checkpointed(block.forward)


class Trainer:
    """One training run on this rank."""

    cfg: RunConfig
    env: DistEnv
    run_dir: Path
    engine: Any  # deepspeed.DeepSpeedEngine
    loader: TrainLoader
    valid_stream: TokenStream
    progress: Progress
    metrics: MetricsLogger
    stop: StopRequest

    def __init__(self, cfg: RunConfig, run_dir: Path, env: DistEnv, resume: checkpoint.ResumePoint | None,
                 init_from: Path | None = None, streams: RunStreams | None = None):
        """`init_from`: weights to start a fresh run from (pretrain.import_hf output or any checkpoint).
        `streams`: the data's token streams as main.check_data opened them (default: opened here)."""
        self.cfg, self.env, self.run_dir = cfg, env, run_dir
        self.checkpoint_dir = run_dir / "checkpoints"
        self.stop = StopRequest()

        seed_everything(cfg.train.seed, env.tp)
        model = build_model(cfg.model)
        if init_from is not None and resume is None:
            from .import_hf import init_from as load_initial_weights

            load_initial_weights(model, init_from)  # ValueError naming the model fields that differ
        if cfg.train.mixer_segment_tokens:
            model.backbone.mixer_segment = cfg.train.mixer_segment_tokens
        if cfg.train.note_selection_noise:
            for layer in model.backbone.layers:
                layer.memory.selection_noise = cfg.train.note_selection_noise
        freeze_parameters(model, cfg.train.freeze)
        parallelize(model)  # over megatron-core's tensor-parallel group; unchanged at tp=1
        # How ds_to_universal merges TP shards; needs the local shapes, which ZeRO-3 hides once it partitions.
        self.universal_info = checkpoint.universal_checkpoint_info(model, env.tp)
        if cfg.deepspeed.activation_checkpointing:
            enable_activation_checkpointing(model)
        model.to(env.device)
        apply_kernels(model)  # Triton SSD scan and memory read on CUDA, the PyTorch reference elsewhere
        optimizer = build_optimizer(model, cfg)

        load_tag = None if resume is None else resume.tag
        if resume is not None and (resume.meta["dp"], resume.meta["tp"]) != (env.dp, env.tp):
            # ZeRO shards of another layout: convert once (rank 0), then every rank loads the universal copy.
            if env.is_main:
                checkpoint.make_universal(resume)
            torch.distributed.barrier()
            load_tag = resume.tag + checkpoint.UNIVERSAL_SUFFIX
        ds_config = deepspeed_config(cfg, env.dp, env.device,
                                     load_universal=load_tag is not None and load_tag != resume.tag)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                                    mpu=env.deepspeed_mpu())

        streams = streams if streams is not None else open_run_streams(cfg.data)
        self.loader = TrainLoader(streams.train, seed=cfg.data.seed, weights=[s.weight for s in cfg.data.sources()])
        self.source_names = source_names(cfg.data)
        self.data_identity = dataset_identity(cfg.data)
        self.valid_stream = streams.validation_stream()
        self.progress = Progress()
        if resume is not None:
            try:
                _, client_state = self.engine.load_checkpoint(str(resume.checkpoint_dir), tag=load_tag,
                                                              load_lr_scheduler_states=False)
            except checkpoint.UNREADABLE as e:
                raise checkpoint.unreadable(resume.checkpoint_dir / load_tag, e) from None
            if client_state is None:
                raise RuntimeError(f"DeepSpeed could not load {resume.checkpoint_dir / load_tag}")
            # Other data than the checkpoint's (main.py allows it only with --allow-new-data): its loader
            # position would index shards it never saw, so the new data's order starts from its beginning.
            same_data = resume.meta.get("data_identity", self.data_identity) == self.data_identity
            self.load_state_dict(client_state["trainer"], restore_loader=same_data)
            checkpoint.restore_rng_states(resume, env.rank, env.world_size)
        self.metrics = MetricsLogger(run_dir, env.is_main, self.progress.step, cfg.train.max_tokens,
                                     self.progress.tokens_seen, cfg.logging.progress_bar, cfg.logging.wandb,
                                     to_dict(cfg))
        self.peak_flops, peak_source = peak_flops_per_second(env.device, cfg.logging.peak_tflops)
        self.metrics.print(f"MFU against {peak_source} per device, {env.world_size} device(s)")
        if init_from is not None and resume is None:
            self.metrics.print(f"weights initialised from {init_from}")

    # ---- state that survives a restart ----

    def state_dict(self) -> dict[str, Any]:
        return {"progress": asdict(self.progress), "loader": self.loader.state_dict(),
                "stage": step_shape(self.cfg.curriculum, self.cfg.train, self.progress.tokens_seen, self.env.dp).stage,
                "config_hash": config_hash(self.cfg)}

    def load_state_dict(self, state: dict[str, Any], restore_loader: bool = True) -> None:
        self.progress = Progress(**state["progress"])
        if restore_loader:
            self.loader.load_state_dict(state["loader"])

    # ---- one step ----

    def forward_backward_step(self, micro_batch: torch.Tensor, num_micro_batches: int) -> float:
        """Forward + backward of one micro-batch (B, L + 1); returns its mean token loss."""
        inputs, labels = micro_batch[:, :-1], micro_batch[:, 1:]
        # Mean over tokens, fused into the LM head (vocab-parallel at tp > 1): no (B, L, V) logits.
        loss = self.engine(inputs, targets=labels)
        self.engine.backward(loss / num_micro_batches, scale_wrt_gas=False)
        return loss.item()

    def _gradient_norm(self) -> float:
        """The 2-norm of all gradients of an unpartitioned model (ZeRO stage 0, after the backward's
        data-parallel all-reduce), a weight replicated over the tensor-parallel ranks counted once."""
        from deepspeed.runtime.utils import is_model_parallel_parameter

        mpu = self.engine.mpu
        first_tp_rank = mpu is None or mpu.get_model_parallel_rank() == 0
        squares = torch.zeros((), device=self.env.device)
        for param in self.engine.module.parameters():
            if param.grad is not None and (first_tp_rank or is_model_parallel_parameter(param)):
                squares += param.grad.float().pow(2).sum()
        if mpu is not None:
            torch.distributed.all_reduce(squares, group=mpu.get_model_parallel_group())
        return float(squares.sqrt())

    def train_step(self) -> StepResult:
        start = time.perf_counter()
        shape = step_shape(self.cfg.curriculum, self.cfg.train, self.progress.tokens_seen, self.env.dp)
        lr = learning_rate(self.cfg.optimizer, self.progress.tokens_seen, self.cfg.train.max_tokens)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # groups resumed from before the key lack it
        batch = self.loader.next_batch(shape.seq_len, shape.global_batch, self.env.dp_rank, self.env.dp)
        batch = torch.from_numpy(batch).to(self.env.device)
        losses = []
        for i, micro_batch in enumerate(batch.split(shape.micro_batch)):
            self.engine.set_gradient_accumulation_boundary(i == shape.grad_accum - 1)
            losses.append(self.forward_backward_step(micro_batch, shape.grad_accum))
        # ZeRO's optimizers keep the norm they clip with; at stage 0 DeepSpeed clips and drops it.
        unpartitioned_norm = self._gradient_norm() if self.cfg.deepspeed.zero_stage == 0 else None
        self.engine.step()
        loss = self._mean_over_data_parallel(float(np.mean(losses)))
        grad_norm = self.engine.get_global_grad_norm() if unpartitioned_norm is None else unpartitioned_norm
        grad_norm = float("nan") if grad_norm is None else float(grad_norm)
        applied = self.engine.was_step_applied() and math.isfinite(loss) and math.isfinite(grad_norm)
        self.progress.step += 1
        self.progress.tokens_seen += shape.tokens
        if applied:
            self.progress.consecutive_skips = 0
        else:
            self.progress.skipped_steps += 1
            self.progress.consecutive_skips += 1
        return StepResult(shape, loss, grad_norm, lr, time.perf_counter() - start)

    def _mean_over_data_parallel(self, value: float) -> float:
        tensor = torch.tensor([value], dtype=torch.float64, device=self.env.device)
        torch.distributed.all_reduce(tensor, group=self.env.dp_group)
        return tensor.item() / self.env.dp

    # ---- validation ----

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean validation loss at each eval.seq_lens length (fixed, whatever the curriculum stage)."""
        self.engine.eval()
        tokens_per_forward = self.cfg.train.micro_batch_size * self.cfg.curriculum.stages[0].seq_len
        results = {}
        for seq_len in self.cfg.eval.seq_lens:
            batch = validation_batch(self.valid_stream, seq_len, self.cfg.eval.samples, self.env.dp_rank, self.env.dp)
            batch = torch.from_numpy(batch).to(self.env.device)
            totals = torch.zeros(2, dtype=torch.float64, device=self.env.device)  # loss sum, token count
            for chunk in batch.split(max(1, tokens_per_forward // seq_len)):
                tokens = chunk[:, 1:].numel()
                totals[0] += self.engine(chunk[:, :-1], targets=chunk[:, 1:]).double() * tokens
                totals[1] += tokens
            torch.distributed.all_reduce(totals, group=self.env.dp_group)
            results[f"valid/loss@{seq_len}"] = (totals[0] / totals[1]).item()
        self.engine.train()
        return results

    # ---- checkpoints ----

    def save_checkpoint(self) -> Path:
        meta = {"step": self.progress.step, "tokens_seen": self.progress.tokens_seen,
                "world_size": self.env.world_size, "dp": self.env.dp, "tp": self.env.tp,
                "data_seed": self.cfg.data.seed, "data": [asdict(s) for s in self.cfg.data.sources()],
                "data_identity": self.data_identity, "config_hash": config_hash(self.cfg),
                "healthy": self.progress.consecutive_skips == 0 and self._parameters_finite()}
        client_state = {"trainer": self.state_dict(), UNIVERSAL_CHECKPOINT_INFO: self.universal_info}
        return checkpoint.save(self.engine, self.checkpoint_dir, self.progress.step, client_state, meta,
                               to_dict(self.cfg), self.cfg.checkpoint.keep_last)

    def _parameters_finite(self) -> bool:
        """Collective: whether every rank's parameters (its ZeRO-3 partition, its TP shard) are finite."""
        local = all(bool(torch.isfinite(getattr(p, "ds_tensor", p)).all()) for p in self.engine.module.parameters())
        flag = torch.tensor([float(local)], device=self.env.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return bool(flag.item())

    # ---- the loop ----

    def train(self, max_steps: int | None = None) -> dict[str, Any]:
        """Train to train.max_tokens or `max_steps`; returns the final record. Stops early on a stop signal."""
        cfg, p = self.cfg, self.progress
        last_saved, last_loss = p.step, None
        window = [0, 0.0]  # tokens and seconds since the last logged step
        while p.tokens_seen < cfg.train.max_tokens and (max_steps is None or p.step < max_steps):
            result = self.train_step()
            last_loss = result.loss
            window[0] += result.shape.tokens
            window[1] += result.seconds
            self.metrics.advance(result.shape.tokens, result.loss)
            if p.step % cfg.logging.every_steps == 0:
                self.log_step(result, tokens_per_s=window[0] / window[1])
                window = [0, 0.0]
            if p.consecutive_skips >= cfg.train.max_consecutive_skips:
                raise TrainingAborted(
                    f"aborting at step {p.step}: {p.consecutive_skips} consecutive steps had a non-finite loss or "
                    f"gradient norm (train.max_consecutive_skips={cfg.train.max_consecutive_skips}); the newest "
                    f"healthy checkpoint in {self.checkpoint_dir} is kept, and --resume auto resumes from it")
            if cfg.eval.every_steps and p.step % cfg.eval.every_steps == 0:
                self.metrics.log({"step": p.step, "tokens": p.tokens_seen, **self.evaluate()})
            if self.stop.agreed():
                path = self.save_checkpoint()
                self.metrics.print(f"stop signal ({self.stop.signal_name or 'on another rank'}): checkpoint {path} "
                                   f"saved at step {p.step}; exiting so the job can be requeued")
                self.metrics.close()
                return {"step": p.step, "tokens": p.tokens_seen, "loss": last_loss, "stopped": True}
            if p.step % cfg.checkpoint.every_steps == 0:
                self.save_checkpoint()
                last_saved = p.step
        final = {"step": p.step, "tokens": p.tokens_seen, **self.evaluate()}
        self.metrics.log(final)
        if last_saved != p.step:
            self.save_checkpoint()
        self.metrics.close()
        return {**final, "loss": last_loss, "stopped": False}

    def log_step(self, result: StepResult, tokens_per_s: float) -> None:
        p, devices = self.progress, self.env.world_size
        flops_per_token = model_flops_per_token(self.cfg.model, result.shape.seq_len).train
        self.metrics.log({"step": p.step, "tokens": p.tokens_seen, "loss": result.loss, "lr": result.lr,
                          "seq_len": result.shape.seq_len, "grad_norm": result.grad_norm, "tokens_per_s": tokens_per_s,
                          "tflops_per_device": achieved_tflops(tokens_per_s, flops_per_token, devices),
                          "mfu": mfu(tokens_per_s, flops_per_token, self.peak_flops, devices),
                          "step_time_s": result.seconds, "skipped_steps": p.skipped_steps, "memory_gb": memory_gb(),
                          **{f"data/tokens/{name}": tokens
                             for name, tokens in zip(self.source_names, self.loader.tokens_by_source())}})
