"""data_prep.sbatch as a real array job: 3 tasks + a dependent merge give the documents of a single-process prepare."""

import re

import numpy as np
import pytest

from data_prep.indexed import IndexedDataset
from data_prep.manifest import load_manifest, split_prefixes


def documents(data_dir, split) -> list[np.ndarray]:
    """Every document of a split, in the order a training loader reads them (manifest shard order)."""
    return [np.array(dataset[i]) for prefix in split_prefixes(data_dir, split)
            for dataset in [IndexedDataset(prefix)] for i in range(len(dataset))]


@pytest.mark.slow
def test_array_prepare_equals_single_process(slurm, pg19_mini, pg19_tokenizer, cli, tmp_path):
    source = f"pg19:{pg19_mini}"
    single, array = tmp_path / "single", tmp_path / "array"
    cli("data_prep.prepare", "--source", source, "--tokenizer", pg19_tokenizer, "--output", single, "--workers", "1")

    # 3 tasks over splits of 14, 2 and 2 books: slices are uneven and task 0 gets no validation/test book.
    job = slurm.sbatch(
        "--array=0-2", "--cpus-per-task=1", f"--output={tmp_path}/%x-%A_%a.log",
        str(slurm.scripts / "data_prep.sbatch"), "--source", source, "--tokenizer", str(pg19_tokenizer),
        "--output", str(array),
    )
    tasks = slurm.wait_finished(job, timeout_s=180)
    logs = {int(t["ArrayTaskId"]): (tmp_path / f"memmamba-data-prep-{job}_{t['ArrayTaskId']}.log").read_text()
            for t in tasks}
    assert [(t["JobState"], t["ExitCode"]) for t in tasks] == [("COMPLETED", "0:0")] * 3, logs
    merge_job = re.search(r"merge job (\d+) waits for array", logs[0]).group(1)
    merge_log = tmp_path / f"memmamba-data-prep-{job}_merge.log"
    (merge,) = slurm.wait_finished(merge_job, timeout_s=60, log=merge_log)
    assert (merge["JobState"], merge["ExitCode"]) == ("COMPLETED", "0:0"), merge_log.read_text()
    assert "merged 3 task manifests" in merge_log.read_text()

    cli("data_prep.verify", array)
    assert not list(array.glob("manifest.task_*.json"))
    merged, reference = load_manifest(array), load_manifest(single)
    assert merged["splits"].keys() == reference["splits"].keys() == {"train", "validation", "test"}
    train_shards = [shard["name"] for shard in merged["splits"]["train"]["shards"]]
    assert [name[:11] for name in train_shards] == ["shard_00000", "shard_00001", "shard_00002"]
    for split, entry in reference["splits"].items():
        for key in ("documents", "tokens", "source_documents", "empty_documents", "books"):
            assert merged["splits"][split][key] == entry[key], (split, key)
        expected, got = documents(single, split), documents(array, split)
        assert len(got) == len(expected) == entry["documents"]
        assert all(np.array_equal(a, b) for a, b in zip(got, expected)), f"{split}: documents differ or are reordered"


def test_failed_task_cancels_the_merge(slurm, synthetic_data, tmp_path):
    missing = tmp_path / "no-such-pg19"
    job = slurm.sbatch(
        "--array=0-1", "--cpus-per-task=1", f"--output={tmp_path}/%x-%A_%a.log", str(slurm.scripts / "data_prep.sbatch"),
        "--source", f"pg19:{missing}", "--tokenizer", str(synthetic_data["tokenizer"]), "--output", str(tmp_path / "out"),
    )
    tasks = slurm.wait_finished(job, timeout_s=180)
    assert [(t["JobState"], t["ExitCode"]) for t in tasks] == [("FAILED", "2:0")] * 2
    log = (tmp_path / f"memmamba-data-prep-{job}_0.log").read_text()
    assert f"error: {missing}: PG19 directory not found" in log.splitlines()
    merge_job = re.search(r"merge job (\d+) waits for array", log).group(1)
    (merge,) = slurm.wait_finished(merge_job, timeout_s=60)
    assert (merge["JobState"], merge["Reason"]) == ("CANCELLED", "DependencyNeverSatisfied")
