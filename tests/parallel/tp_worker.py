"""One rank of the TP=2 parity run; test_tp_parity.py starts two of these (gloo, CPU).

    RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p python tests/parallel/tp_worker.py WORKDIR

Reads WORKDIR/cases.pt, {case name: {"config", "state_dict", "input_ids", "labels", "mode"}}, where
mode is "train" (forward + loss_fn + backward), "blockwise" (the same after overwriting in_proj with
a block-wise split, the wrong layout), "bf16" (parallelize a bfloat16 model, no forward) or
"misconfigured" (parallelize must raise). Writes WORKDIR/rank<r>.pt with, per case, what this
rank saw: its logits slice, gathered logits, loss, gradients of its parameters, parameter dtypes,
megatron partition attributes, or the error message. The test compares them with TP=1.
"""

import os
import sys
from pathlib import Path

import torch


def partition_attributes(model: torch.nn.Module) -> dict[str, tuple | None]:
    return {name: (param.tensor_model_parallel, param.partition_dim, param.partition_stride)
            if hasattr(param, "tensor_model_parallel") else None for name, param in model.named_parameters()}


def run_case(config, state_dict, input_ids, labels, mode: str, rank: int) -> dict:
    from model import build_model
    from model.parallel import gather_logits, loss_fn, parallelize

    model = build_model(config)
    model.load_state_dict(state_dict)
    if mode == "bf16":
        model.to(torch.bfloat16)
    if mode == "misconfigured":
        try:
            parallelize(model)
        except ValueError as error:
            return {"error": str(error)}
        return {"error": None}
    parallelize(model)
    result = {"attributes": partition_attributes(model),
              "dtypes": {name: param.dtype for name, param in model.named_parameters()}}
    if mode == "bf16":
        return result
    if mode == "blockwise":
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("in_proj.weight"):
                    param.copy_(state_dict[name].chunk(2, dim=0)[rank])
    logits = model(input_ids)
    logits_before_loss = logits.detach().clone()
    loss = loss_fn(logits, labels)
    loss.backward()
    return {
        **result,
        "logits": logits.detach(),
        "logits_untouched_by_loss": torch.equal(logits.detach(), logits_before_loss),
        "gathered_logits": gather_logits(logits).detach(),
        "loss": loss.detach(),
        "grads": {name: param.grad for name, param in model.named_parameters()},
    }


def main(workdir: Path) -> None:
    from megatron.core import parallel_state

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    torch.distributed.init_process_group("gloo")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=int(os.environ["WORLD_SIZE"]))
    cases = torch.load(workdir / "cases.pt", weights_only=False)
    results = {name: run_case(**case, rank=rank) for name, case in cases.items()}
    torch.save(results, workdir / f"rank{rank}.pt.tmp")
    os.replace(workdir / f"rank{rank}.pt.tmp", workdir / f"rank{rank}.pt")
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
