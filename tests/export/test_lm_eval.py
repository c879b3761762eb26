"""lm-evaluation-harness on our exports: `lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True`.

lm-eval's own `simple_evaluate` runs three local tasks (a task YAML over a jsonl file written here,
no hub access), one per output type: loglikelihood, multiple_choice and generate_until, at batch
size 2 so that its padding is exercised (right padding for loglikelihoods, left padding with an
attention mask for generation). Each per-example output must equal our own evaluation of the
same example with our model: the summed log-probability of the continuation (lm-eval's token
split: the context encoded alone, the continuation the rest of context + continuation, joined
with no delimiter), whether
it is the greedy continuation, and the greedy generation up to the first newline.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from pretrain.export import export

from .conftest import random_model, save_as_checkpoint, tiny_config

pytestmark = pytest.mark.slow
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the tasks' data is a local file: never ask the hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")
lm_eval = pytest.importorskip("lm_eval", reason="the `eval` extra (lm-eval) is not installed")

ROWS = [
    {"context": "The lamp is", "continuation": " red.", "choices": [" red.", " blue.", " very old."], "gold": 0},
    {"context": "Once upon a time there was", "continuation": " a cat.", "choices": [" a cat.", " a dog."], "gold": 1},
    {"context": "What is the pass key? The pass key is", "continuation": " 4821", "choices": [" 1", " 22"], "gold": 0},
]
MAX_GEN_TOKS = 6
TASKS = {
    "ours_loglikelihood": "output_type: loglikelihood\ndoc_to_text: '{{context}}'\ndoc_to_target: '{{continuation}}'\n"
                          "metric_list:\n  - metric: acc\n",
    "ours_multiple_choice": "output_type: multiple_choice\ndoc_to_text: '{{context}}'\ndoc_to_choice: '{{choices}}'\n"
                            "doc_to_target: gold\nmetric_list:\n  - metric: acc\n",
    "ours_generate_until": "output_type: generate_until\ndoc_to_text: '{{context}}'\ndoc_to_target: '{{continuation}}'\n"
                           f"generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: {MAX_GEN_TOKS}\n  do_sample: false\n"
                           "metric_list:\n  - metric: exact_match\n",
}


def write_tasks(root: Path) -> Path:
    data = root / "examples.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    tasks = root / "tasks"
    tasks.mkdir()
    for name, body in TASKS.items():
        (tasks / f"{name}.yaml").write_text(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                            f"    test: {data}\ntest_split: test\ntarget_delimiter: ''\n{body}")
    return tasks


def our_loglikelihood(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    context_ids = tokenizer.encode(context)
    whole = tokenizer.encode(context + continuation)
    target = torch.tensor(whole[len(context_ids):])
    with torch.no_grad():
        logits = model(torch.tensor([whole[:-1]]))[0, len(context_ids) - 1:].double()
    logprobs = logits.log_softmax(-1)
    return float(logprobs.gather(1, target[:, None]).sum()), bool(torch.equal(logits.argmax(-1), target))


def our_generation(model, tokenizer, hf_tokenizer, context: str) -> str:
    ids = torch.tensor([tokenizer.encode(context)])
    with torch.no_grad():
        for _ in range(MAX_GEN_TOKS):  # greedy; the full forward each time (no cache: the reference path)
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], 1)
    text = hf_tokenizer.decode(ids[0, -MAX_GEN_TOKS:].tolist(), skip_special_tokens=True)
    return text.split("\n")[0]


@pytest.mark.parametrize("arch, remote", [("memmamba", True), ("mamba2", False), ("transformer", False)])
def test_lm_eval_on_every_export_type_equals_our_evaluation(arch, remote, synthetic_data, tmp_path):
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    from tokenizer import Tokenizer

    model = random_model(tiny_config(arch))
    hf_dir = tmp_path / "hf"
    export(save_as_checkpoint(model, tmp_path / "ckpt"), hf_dir, tokenizer=synthetic_data["tokenizer"])
    assert any(hf_dir.glob("*.py")) == remote  # MemMamba as remote code, the others as native classes
    results = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={hf_dir},trust_remote_code=True,dtype=float32", tasks=list(TASKS),
        batch_size=2, device="cpu", task_manager=TaskManager(include_path=str(write_tasks(tmp_path))),
        log_samples=True)
    samples = {task: sorted(results["samples"][task], key=lambda s: s["doc_id"]) for task in TASKS}
    tokenizer, hf_tokenizer = Tokenizer(synthetic_data["tokenizer"]), AutoTokenizer.from_pretrained(hf_dir)

    for row, sample in zip(ROWS, samples["ours_loglikelihood"]):
        (theirs,) = sample["filtered_resps"]
        ours = our_loglikelihood(model, tokenizer, row["context"], row["continuation"])
        assert theirs[0] == pytest.approx(ours[0], abs=1e-4) and theirs[1] == ours[1], (row, theirs, ours)
    for row, sample in zip(ROWS, samples["ours_multiple_choice"]):
        theirs = [ll for ll, _ in sample["filtered_resps"]]
        ours = [our_loglikelihood(model, tokenizer, row["context"], choice)[0] for choice in row["choices"]]
        assert theirs == pytest.approx(ours, abs=1e-4), (row, theirs, ours)
    for row, sample in zip(ROWS, samples["ours_generate_until"]):
        assert sample["filtered_resps"] == [our_generation(model, tokenizer, hf_tokenizer, row["context"])], row
