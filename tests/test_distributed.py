"""Two real processes on a loopback ring: a card crosses mx.distributed intact.

Each test starts two ranks of tests/dist_worker.py with ``MLX_RANK`` and a ring
hostfile on free local ports (what ``mlx.launch -n 2 --backend ring`` sets up),
and bounds the whole run to ``TIME_LIMIT`` seconds, killing both on expiry.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import dist_worker
import mlx.core as mx
import pytest

pytestmark = pytest.mark.skipif(
    not mx.distributed.is_available("ring"),
    reason="mx.distributed ring backend not available on this platform",
)

WORKER = Path(__file__).with_name("dist_worker.py")
ROOT = WORKER.parent.parent
TIME_LIMIT = 120.0


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Ring:
    """Both ranks of one scenario, killed on exit whatever happened."""

    def __init__(self, tmp_path: Path, scenario: str, *args: str):
        hostfile = tmp_path / "hosts.json"
        hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in free_ports(2)]))
        self.deadline = time.monotonic() + TIME_LIMIT
        self.procs = []
        for rank in range(2):
            env = {**os.environ, "MLX_RANK": str(rank), "MLX_HOSTFILE": str(hostfile)}
            self.procs.append(
                subprocess.Popen(
                    [sys.executable, str(WORKER), scenario, *args],
                    cwd=ROOT,
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    start_new_session=True,
                )
            )

    def wait(self, rank: int) -> tuple[int, str, str]:
        proc = self.procs[rank]
        try:
            out, err = proc.communicate(
                timeout=max(self.deadline - time.monotonic(), 1)
            )
        except subprocess.TimeoutExpired:
            self.kill()
            out, err = proc.communicate()
            pytest.fail(
                f"rank {rank} still running after {TIME_LIMIT} s:\n{out}\n{err}"
            )
        return proc.returncode, out, err

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.kill()
        for proc in self.procs:
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()


def receiver_line(out: str, prefix: str) -> str:
    lines = [line for line in out.splitlines() if line.startswith(prefix)]
    assert lines, f"receiver printed no {prefix!r} line:\n{out}"
    return lines[-1][len(prefix) :]


def test_card_sent_over_the_ring_continues_like_in_process(tmp_path):
    with Ring(tmp_path, "handoff") as ring:
        # The single-process handoff, computed while the ranks start up.
        model = dist_worker.build_tiny_model()
        card = dist_worker.make_card(model)
        expected = dist_worker.continue_from(card, model)

        code1, out1, err1 = ring.wait(1)
        code0, _, err0 = ring.wait(0)
    assert code1 == dist_worker.EXIT_OK, f"receiver failed:\n{out1}\n{err1}"
    assert code0 == dist_worker.EXIT_OK, f"sender failed:\n{err0}"
    result = json.loads(receiver_line(out1, "RESULT "))
    assert result["checksum"] == card.checksum()
    assert result["bytes"] == len(card.to_bytes()) > 2 * 4096  # several chunks
    assert len(expected) == dist_worker.MAX_TOKENS
    assert result["tokens"] == expected


@pytest.mark.parametrize(
    "scenario, error, code",
    [
        ("silent", "TransportTimeoutError", dist_worker.EXIT_TIMEOUT),
        ("die", "TransportError", dist_worker.EXIT_TRANSPORT),
    ],
)
def test_receiver_gives_up_within_its_timeout(tmp_path, scenario, error, code):
    timeout = 3.0
    with Ring(tmp_path, scenario, "--timeout", str(timeout)) as ring:
        code1, out1, err1 = ring.wait(1)
    assert code1 == code, f"receiver exit {code1}, expected {code}:\n{out1}\n{err1}"
    line = receiver_line(out1, "ERROR ")
    name, _, elapsed = line.split(" s:")[0].partition(" after ")
    assert name == error, line
    assert float(elapsed) < timeout + 1.0, line
    if scenario == "silent":
        assert float(elapsed) >= timeout, line


def test_corrupted_transfer_is_rejected_by_the_checksum(tmp_path):
    with Ring(tmp_path, "corrupt") as ring:
        code1, out1, err1 = ring.wait(1)
    assert code1 == dist_worker.EXIT_INTEGRITY, f"receiver:\n{out1}\n{err1}"
    assert "transfer checksum" in receiver_line(out1, "ERROR CardIntegrityError")
    # A rejected transfer leaves the link in step: the resent card arrives intact.
    resent = json.loads(receiver_line(out1, "RESENT "))
    assert resent["checksum"] == dist_worker.synthetic_card().checksum()


def test_signed_card_over_the_ring_needs_the_key(tmp_path):
    from qkvshare_mlx.card.auth import CardKey

    with Ring(tmp_path, "signed") as ring:
        code1, out1, err1 = ring.wait(1)
    assert code1 == dist_worker.EXIT_OK, f"receiver:\n{out1}\n{err1}"
    refused = [line for line in out1.splitlines() if line.startswith("REFUSED ")]
    key_id = CardKey(dist_worker.CARD_KEY).key_id
    other_id = CardKey(dist_worker.OTHER_KEY).key_id
    assert len(refused) == 2 and "unsigned" in refused[0], refused
    assert other_id in refused[1] and key_id in refused[1], refused
    got = json.loads(receiver_line(out1, "SIGNED "))
    assert got == {
        "checksum": dist_worker.synthetic_card().checksum(),
        "key_id": key_id,
    }


def test_demo_outside_mlx_launch_fails_with_one_clear_line(monkeypatch, capsys):
    from qkvshare_mlx.cli import dist_demo

    monkeypatch.delenv("MLX_RANK", raising=False)
    monkeypatch.delenv("MLX_HOSTFILE", raising=False)
    assert dist_demo.main(["--budget-bits", "4"]) == dist_demo.EXIT_TRANSPORT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mlx.launch --backend ring" in err[0]
