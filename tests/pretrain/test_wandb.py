"""logging.wandb in offline mode: the run directory W&B writes holds the same scalars as metrics.jsonl
and the resolved config, read back from W&B's own record format (its protobuf `Record`s)."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest

from .conftest import tiny_overrides, train

pytestmark = pytest.mark.slow
wandb_internal_pb2 = pytest.importorskip("wandb.proto.wandb_internal_pb2",
                                         reason="the `wandb` extra is not installed")


def wandb_records(path: Path):
    """The records of a .wandb file: a 7-byte header (":W&B", magic, version), then LevelDB-log blocks
    of 32 KiB whose chunks are (crc32: 4 bytes, length: 2, type: 1 full / 2 first / 3 middle / 4 last)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, position, pending = 32768, 7, b""
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block tail too short for a chunk header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_offline_run_holds_the_scalars_and_the_config(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    train(run_dir, [*tiny_overrides(tiny_data), "logging.wandb.project=memmamba-tests",
                    "logging.wandb.mode=offline"], nproc=1)
    (log,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    history, config = {}, {}
    for record in wandb_records(log):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history.setdefault(items["_step"], {}).update(items)
        elif kind == "run":
            config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
    jsonl = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in jsonl if "loss" in r]
    assert sorted(history) == [r["step"] for r in steps]
    for record in steps:
        logged = history[record["step"]]
        assert logged["train/loss"] == pytest.approx(record["loss"]) and logged["perf/mfu"] == pytest.approx(record["mfu"])
        assert logged["train/lr"] == pytest.approx(record["lr"]) and logged["train/tokens_seen"] == record["tokens"]
    assert history[8]["valid/loss@64"] == pytest.approx(jsonl[-1]["valid/loss@64"])
    assert config["data"]["path"] == str(tiny_data) and config["logging"]["wandb"]["mode"] == "offline"
    assert (run_dir / "wandb_run_id").read_text().strip() in log.name


def test_without_a_project_wandb_is_never_imported(tiny_data, tmp_path):
    from pretrain.metrics import MetricsLogger

    sys.modules.pop("wandb", None)
    logger = MetricsLogger(tmp_path, True, 0, 100, 0, False)
    logger.log({"step": 1, "tokens": 10, "valid/loss@64": 1.0})
    logger.close()
    assert "wandb" not in sys.modules
