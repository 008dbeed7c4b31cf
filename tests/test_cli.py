"""The ``qkvshare`` dispatcher (cli/__init__): verbs, unknown verbs, one-line
errors with exit 2, ``--debug`` tracebacks."""

import subprocess
import sys


def test_cli_help_lists_available_verbs():
    result = subprocess.run(
        [sys.executable, "-m", "qkvshare_mlx", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0
    assert "doctor" in result.stdout and "demo" in result.stdout


def test_cli_unknown_verb_exit_2():
    result = subprocess.run(
        [sys.executable, "-m", "qkvshare_mlx", "frobnicate"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("qkvshare: error: unknown verb 'frobnicate'")


def _run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "qkvshare_mlx", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_bad_model_path_is_one_line_exit_2():
    result = _run_cli("doctor", "--model", "/nonexistent")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "qkvshare: error: model folder /nonexistent does not exist"
    ]
    assert "Traceback" not in result.stdout + result.stderr


def test_cli_debug_shows_traceback():
    result = _run_cli("doctor", "--model", "/nonexistent", "--debug")
    assert result.returncode != 0
    assert "Traceback" in result.stderr
    assert "ModelLoadError" in result.stderr
