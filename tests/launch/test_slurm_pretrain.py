"""pretrain.sbatch on the local cluster: 2 ranks train, preemption checkpoints + requeues + resumes exactly, bad config fails fast.

Two runs of the same tiny quickstart config: a reference run, and one preempted with
`scancel --signal=USR1 --batch` mid-training, released with `scontrol update StartTime=now`. Their
final parameters (consolidated from the ZeRO-3 partitions by DeepSpeed) and per-step losses must be equal.
"""

import json
import time
from pathlib import Path

import pytest
import torch
import yaml

MAX_STEPS = 16
# Tiny and quick: one curriculum length, a checkpoint only at the end (or when signalled), no periodic eval.
OVERRIDES = [
    "--set", "logging.every_steps=1", "--set", "logging.progress_bar=false", "--set", "eval.every_steps=0",
    "--set", "eval.seq_lens=[256]", "--set", f"checkpoint.every_steps={10 * MAX_STEPS}",
    "--set", "curriculum.stages=[{tokens: 0, seq_len: 256}]",
]
# The local node has no GPUs: one CPU per rank, a gloo rank per task.
TWO_RANKS = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1"]


def submit_training(slurm, tmp_path: Path, name: str, data: Path, config: Path | None = None) -> tuple[str, Path, Path]:
    """Submits pretrain.sbatch with 2 ranks; returns (job id, run dir, log path)."""
    run_dir, log = tmp_path / name, tmp_path / f"{name}.log"
    job = slurm.sbatch(
        *TWO_RANKS, f"--job-name={name}", f"--output={log}", str(slurm.scripts / "pretrain.sbatch"),
        "--config", str(config or slurm.repo / "configs" / "quickstart.yaml"), "--set", f"data.path={data}",
        "--max-steps", str(MAX_STEPS), "--run-dir", str(run_dir), *OVERRIDES,
    )
    return job, run_dir, log


def train_losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def final_parameters(run_dir: Path) -> dict[str, torch.Tensor]:
    """fp32 weights gathered from every rank's ZeRO-3 partition of the newest checkpoint."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    checkpoints = run_dir / "checkpoints"
    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoints), tag=(checkpoints / "latest").read_text().strip())


@pytest.fixture(scope="module")
def reference_run(slurm, synthetic_data, tmp_path_factory) -> dict:
    tmp_path = tmp_path_factory.mktemp("reference")
    job, run_dir, log = submit_training(slurm, tmp_path, "reference", synthetic_data["data"])
    (record,) = slurm.wait_finished(job, timeout_s=600, log=log)
    return {"record": record, "run_dir": run_dir, "log": log.read_text()}


@pytest.mark.slow
def test_two_ranks_train_and_checkpoint(reference_run):
    log, run_dir = reference_run["log"], reference_run["run_dir"]
    assert (reference_run["record"]["JobState"], reference_run["record"]["ExitCode"]) == ("COMPLETED", "0:0"), log
    assert "[pretrain.sbatch] rank 0 of 2 (local rank 0)" in log and "[pretrain.sbatch] rank 1 of 2 (local rank 1)" in log
    assert "world 2 = tp 1 x dp 2, starting fresh" in log
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"global_step{MAX_STEPS}"
    meta = json.loads((run_dir / "checkpoints" / f"global_step{MAX_STEPS}" / "meta.json").read_text())
    assert (meta["step"], meta["world_size"], meta["dp"]) == (MAX_STEPS, 2, 2)
    losses = train_losses(run_dir)
    assert sorted(losses) == list(range(1, MAX_STEPS + 1))
    assert losses[MAX_STEPS] < losses[1]  # it trained


@pytest.mark.slow
def test_preempted_job_checkpoints_requeues_and_resumes_exactly(slurm, synthetic_data, reference_run, tmp_path):
    job, run_dir, log = submit_training(slurm, tmp_path, "preempted", synthetic_data["data"])

    def trained_a_few_steps() -> bool:
        metrics = run_dir / "metrics.jsonl"
        return metrics.exists() and any(step >= 3 for step in train_losses(run_dir))

    slurm.wait_until(trained_a_few_steps, timeout_s=600, what="3 training steps of the job to preempt")
    slurm.run("scancel", "--signal=USR1", "--batch", job)
    # A requeued job is PENDING with Reason None until the scheduler's next pass gives it BeginTime.
    slurm.wait_until(lambda: (slurm.job(job)["Restarts"], slurm.job(job)["JobState"], slurm.job(job)["Reason"])
                     == ("1", "PENDING", "BeginTime"), timeout_s=120, what="the preempted job to be requeued")
    # slurmd refuses to relaunch a job in the same second its credential was revoked by the requeue
    # ("Job credential revoked"; credential times are whole seconds): release it a moment later.
    time.sleep(2)
    saved_tag = (run_dir / "checkpoints" / "latest").read_text().strip()
    saved_step = int(saved_tag.removeprefix("global_step"))
    assert 3 <= saved_step < MAX_STEPS, f"checkpoint {saved_tag} is not mid-training"

    slurm.run("scontrol", "update", f"jobid={job}", "StartTime=now")
    (record,) = slurm.wait_finished(job, timeout_s=600, log=log)
    text = log.read_text()
    assert (record["JobState"], record["ExitCode"], record["Restarts"]) == ("COMPLETED", "0:0", "1"), text
    assert "[pretrain.sbatch] SIGUSR1 received" in text and f"ranks exited with status 0; requeueing job {job}" in text
    assert f"job {job} (restart 1): 2 ranks" in text
    assert f"resuming from {run_dir / 'checkpoints' / saved_tag} (step {saved_step})" in text

    assert train_losses(run_dir) == train_losses(reference_run["run_dir"])
    resumed, reference = final_parameters(run_dir), final_parameters(reference_run["run_dir"])
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[name], reference[name]) for name in reference), "final parameters differ"


@pytest.mark.slow
def test_bad_config_fails_fast_with_clear_error(slurm, synthetic_data, tmp_path):
    config = yaml.safe_load((slurm.repo / "configs" / "quickstart.yaml").read_text())
    config["model"]["d_model"] = -1
    bad_config = tmp_path / "bad.yaml"
    bad_config.write_text(yaml.safe_dump(config))
    job, run_dir, log = submit_training(slurm, tmp_path, "bad-config", synthetic_data["data"], config=bad_config)
    (record,) = slurm.wait_finished(job, timeout_s=300, log=log)
    text = log.read_text()
    assert (record["JobState"], record["ExitCode"]) == ("FAILED", "2:0"), text
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {bad_config}: invalid config: model.d_model: must be a positive integer, got -1"], text
    assert "Traceback" not in text
    # Fast: it failed while reading the config, before any process group or DeepSpeed was set up.
    assert "DeepSpeed" not in text and "run dir" not in text
    assert not run_dir.exists()


@pytest.mark.slow
def test_export_job_writes_the_trained_weights(slurm, synthetic_data, reference_run, tmp_path):
    from safetensors.torch import load_file

    hf_dir, log = tmp_path / "hf", tmp_path / "export.log"
    job = slurm.sbatch(
        "--cpus-per-task=1", "--mem=1G", f"--output={log}", str(slurm.scripts / "export.sbatch"),
        "--checkpoint", str(reference_run["run_dir"]), "--output", str(hf_dir),
        "--tokenizer", str(synthetic_data["tokenizer"]),
    )
    (record,) = slurm.wait_finished(job, timeout_s=600, log=log)
    assert (record["JobState"], record["ExitCode"]) == ("COMPLETED", "0:0"), log.read_text()
    exported, trained = load_file(hf_dir / "model.safetensors"), final_parameters(reference_run["run_dir"])
    assert exported.keys() <= trained.keys() and "backbone.embeddings.weight" in exported
    assert all(torch.equal(exported[name], trained[name]) for name in exported)
