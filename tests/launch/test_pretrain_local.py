"""launch_scripts/pretrain_local.sh: argument checks, and the ranks' exit code comes back through the DeepSpeed launcher."""

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "launch_scripts" / "pretrain_local.sh"


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)


def test_help_and_bad_gpu_count():
    shown = run("--help")
    assert shown.returncode == 0 and "--num-gpus N" in shown.stdout
    refused = run("--num-gpus", "zero", "--config", "configs/quickstart.yaml")
    assert refused.returncode == 2
    assert refused.stderr.strip() == "pretrain_local.sh: error: --num-gpus/NUM_GPUS: expected a positive integer, got 'zero'"


def test_bad_config_exit_code_comes_through_the_launcher(synthetic_data, tmp_path):
    result = run("--num-gpus", "2", "--config", "configs/quickstart.yaml", "--set", f"data.path={synthetic_data['data']}",
                 "--set", "train.no_such_key=1", "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error: --set train.no_such_key=1: unknown key 'train.no_such_key'" in result.stderr.splitlines()
    assert not (tmp_path / "run").exists()
