"""The study's resumable state file: JSON lines, plain or gzip members."""

import gzip
import json

import pytest

from qkvshare_mlx.errors import ConfigError
from qkvshare_mlx.evals.state import GZIP_CHUNK, State


def test_state_resumes(tmp_path):
    path = tmp_path / "state.jsonl"
    state = State(path)
    rows = [
        {
            "kind": "tf",
            "problem": 0,
            "mode": "uniform",
            "budget_bits": 3,
            "hops": 1,
            "kl": 0.5,
        },
        {
            "kind": "gen",
            "problem": 0,
            "mode": "exact",
            "budget_bits": None,
            "hops": 4,
            "correct": True,
        },
    ]
    for r in rows:
        state.add(r)
    with open(path, "a") as f:  # a line cut short by a kill
        f.write(json.dumps(rows[0])[:20])
    again = State(path)
    assert ("tf", 0, "uniform", 3.0, 1) in again  # budgets compare as floats
    assert ("gen", 0, "exact", None, 4) in again
    assert ("tf", 1, "uniform", 3.0, 1) not in again
    assert len(again.rows) == 2


def test_state_gzip_resumes(tmp_path):
    """A .gz state: one member per row; a member cut by a kill is dropped and
    the next row appended after it reads back; damage mid-file is refused."""
    path = tmp_path / "state.jsonl.gz"
    row = {"kind": "tf", "problem": 0, "mode": "uniform", "budget_bits": 3, "hops": 1}
    State(path).add(row)
    whole = path.read_bytes()
    with open(path, "ab") as f:  # a member cut short by a kill
        f.write(gzip.compress(json.dumps({**row, "problem": 1}).encode())[:15])
    again = State(path)
    assert list(again.rows) == [("tf", 0, "uniform", 3.0, 1)]
    assert path.read_bytes() == whole
    again.add({**row, "problem": 2})
    assert ("tf", 2, "uniform", 3.0, 1) in State(path)
    assert gzip.decompress(path.read_bytes()).decode().count("\n") == 2
    broken = bytearray(path.read_bytes())
    broken[12] ^= 0xFF  # inside the first member's deflate data
    path.write_bytes(bytes(broken))
    with pytest.raises(ConfigError, match="corrupt at byte 0"):
        State(path)
    assert path.read_bytes() == bytes(broken)


def test_state_gzip_many_members(tmp_path):
    """Many appended members straddle the reader's chunk boundaries and all
    read back; a cut tail is still dropped at its member boundary."""
    path = tmp_path / "state.jsonl.gz"
    row = {"kind": "tf", "problem": 0, "mode": "uniform", "budget_bits": 3, "hops": 1}
    state = State(path)
    for i in range(400):
        state.add({**row, "problem": i, "pad": "x" * (i % 37)})
    assert path.stat().st_size > 3 * GZIP_CHUNK
    whole = path.read_bytes()
    with open(path, "ab") as f:
        f.write(gzip.compress(json.dumps({**row, "problem": 400}).encode())[:-4])
    again = State(path)
    assert sorted(k[1] for k in again.rows) == list(range(400))
    assert again.rows[("tf", 399, "uniform", 3.0, 1)]["pad"] == "x" * (399 % 37)
    assert path.read_bytes() == whole
