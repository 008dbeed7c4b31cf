"""``qkvshare inspect`` (cli/inspect): a model mismatch and a closed pipe."""

import subprocess
import sys

import pytest

from qkvshare_mlx.cli import main
from qkvshare_mlx.testing.mutations import small_card


def test_inspect_json_into_a_closed_pipe_exits_quietly(tmp_path):
    path = small_card().save(tmp_path / "c.qkv")
    cmd = f"{sys.executable} -m qkvshare_mlx inspect --json {path} | head -1"
    result = subprocess.run(
        ["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True
    )
    assert result.stdout == "{\n" and "Traceback" not in result.stderr
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_inspect_model_mismatch_exits_2(tmp_path, default_model_dir, capsys):
    path = small_card().save(tmp_path / "c.qkv")
    assert main(["inspect", str(path), "--model", str(default_model_dir)]) == 2
    out = capsys.readouterr()
    assert "model check" in out.out
    err = out.err.strip().splitlines()
    assert len(err) == 1 and "made for another model" in err[0]
