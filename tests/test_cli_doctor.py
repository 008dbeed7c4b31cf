"""``qkvshare doctor`` (cli/doctor): a verdict, and a failing exit code."""

import sys

import pytest

from qkvshare_mlx.cli.doctor import verdict

HEALTHY = {
    "openblas_effective": True,
    "openblas_note": "ok",
    "argmax_agree": True,
    "logits_max_abs_diff": 1e-5,
}


def test_healthy_report_has_no_failed_check():
    assert verdict(HEALTHY) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux BLAS only")
def test_blas_preload_off_fails(monkeypatch):
    monkeypatch.delenv("QKVSHARE_NO_OPENBLAS", raising=False)
    report = {**HEALTHY, "openblas_effective": False, "openblas_note": "never called"}
    assert verdict(report) == ["OpenBLAS preload: never called"]
    monkeypatch.setenv("QKVSHARE_NO_OPENBLAS", "1")  # opted out: not a failure
    assert verdict(report) == []


def test_runtimes_that_disagree_fail():
    bad = {**HEALTHY, "argmax_agree": False, "logits_max_abs_diff": 0.5}
    assert len(verdict(bad)) == 2
