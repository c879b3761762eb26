"""One rank of the TP=2 runs; test_tp_parity.py starts two of these (gloo, CPU).

    RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p python tests/parallel/tp_worker.py WORKDIR

Reads WORKDIR/cases.pt, {case name: {"mode": ..., "config", "state_dict", ...}}, and writes what
this rank saw to WORKDIR/rank<r>.pt, {case name: results}. Modes:
- "train": forward, loss_fn, backward: logits slice, gathered logits, loss, gradients, dtypes and
  megatron partition attributes of the parameters; then the fused loss (``model(ids, targets=...)``,
  what the trainer runs) and its gradients.
- "blockwise": the same after overwriting in_proj with a block-wise split (the wrong layout).
- "bf16": parallelize a bfloat16 model; parameter dtypes only.
- "misconfigured": parallelize must raise; the error message.
- "zero3": DeepSpeed ZeRO-3 steps on the TP model (the trainer's wiring: parallelize, then
  deepspeed.initialize with pretrain's megatron mpu, the fused loss), then a checkpoint carrying
  universal_checkpoint_info; the losses and global gradient norms.
"""

import os
import sys
from pathlib import Path

import torch


def _tp_model(config, state_dict, dtype=torch.float32):
    from model import build_model
    from model.parallel import parallelize

    model = build_model(config)
    model.load_state_dict(state_dict)
    return parallelize(model.to(dtype))


def _describe(model: torch.nn.Module) -> dict:
    attributes = {name: (param.tensor_model_parallel, param.partition_dim, param.partition_stride)
                  if hasattr(param, "tensor_model_parallel") else None for name, param in model.named_parameters()}
    return {"attributes": attributes, "dtypes": {name: param.dtype for name, param in model.named_parameters()}}


def run_train(config, state_dict, input_ids, labels, rank: int, blockwise_in_proj: bool = False) -> dict:
    from model.parallel import gather_logits, loss_fn

    model = _tp_model(config, state_dict)
    if blockwise_in_proj:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("in_proj.weight"):
                    param.copy_(state_dict[name].chunk(2, dim=0)[rank])
    logits = model(input_ids)
    logits_before_loss = logits.detach().clone()
    loss = loss_fn(logits, labels)
    loss.backward()
    grads = {name: param.grad for name, param in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    fused_loss = model(input_ids, targets=labels)  # the trainer's path: the loss fused into the LM head
    fused_loss.backward()
    return {
        **_describe(model),
        "logits": logits.detach(),
        "logits_untouched_by_loss": torch.equal(logits.detach(), logits_before_loss),
        "gathered_logits": gather_logits(logits).detach(),
        "loss": loss.detach(),
        "grads": grads,
        "fused_loss": fused_loss.detach(),
        "fused_grads": {name: param.grad for name, param in model.named_parameters()},
    }


def run_misconfigured(config, state_dict, rank: int) -> dict:
    try:
        _tp_model(config, state_dict)
    except ValueError as error:
        return {"error": str(error)}
    return {"error": None}


def run_zero3(config, state_dict, batches, lr: float, checkpoint_dir: str, rank: int) -> dict:
    import deepspeed
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO

    from pretrain.checkpoint import universal_checkpoint_info
    from pretrain.distributed import MegatronMPU

    model = _tp_model(config, state_dict)
    ds_config = {"train_micro_batch_size_per_gpu": batches[0].shape[0], "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True, "gradient_clipping": 1.0}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=lr),
                                           config=ds_config, mpu=MegatronMPU())
    losses, grad_norms = [], []
    for tokens in batches:
        loss = engine(tokens[:, :-1], targets=tokens[:, 1:])
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
        grad_norms.append(float(engine.get_global_grad_norm()))
    engine.save_checkpoint(checkpoint_dir, tag="final",
                           client_state={UNIVERSAL_CHECKPOINT_INFO: universal_checkpoint_info(model, 2)})
    return {"losses": losses, "grad_norms": grad_norms}


def run_case(mode: str, rank: int, **fields) -> dict:
    if mode == "train":
        return run_train(**fields, rank=rank)
    if mode == "blockwise":
        return run_train(**fields, rank=rank, blockwise_in_proj=True)
    if mode == "bf16":
        return _describe(_tp_model(fields["config"], fields["state_dict"], torch.bfloat16))
    if mode == "misconfigured":
        return run_misconfigured(**fields, rank=rank)
    if mode == "zero3":
        return run_zero3(**fields, rank=rank)
    raise ValueError(f"unknown mode {mode!r}")


def main(workdir: Path) -> None:
    from megatron.core import parallel_state

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    torch.distributed.init_process_group("gloo")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=int(os.environ["WORLD_SIZE"]))
    cases = torch.load(workdir / "cases.pt", weights_only=False)
    results = {name: run_case(rank=rank, **case) for name, case in cases.items()}
    torch.save(results, workdir / f"rank{rank}.pt.tmp")
    os.replace(workdir / f"rank{rank}.pt.tmp", workdir / f"rank{rank}.pt")
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
