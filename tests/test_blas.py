"""qkvshare_mlx.blas: OpenBLAS for MLX's CPU backend, only when asked for."""

import pytest
from conftest import run_python

from qkvshare_mlx import blas


def test_pick_coretype_from_flags():
    avx512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd", "avx2", "fma"}
    assert blas.pick_coretype(avx512) == "SkylakeX"
    assert blas.pick_coretype({"avx2", "fma", "sse4_2"}) == "Haswell"
    assert blas.pick_coretype({"sse4_2"}) is None


_STATUS = "from qkvshare_mlx.blas import openblas_status as s; print(s())"
needs_openblas = pytest.mark.skipif(
    blas.openblas_library_path() is None or not blas.openblas_library_path().exists(),
    reason="Debian OpenBLAS (libopenblas0-pthread) not installed",
)


@needs_openblas
def test_enable_openblas_preloads_it():
    result = run_python(
        f"import qkvshare_mlx; qkvshare_mlx.enable_openblas(); {_STATUS}"
    )
    assert "'preloaded': True, 'effective': True" in result.stdout, result.stderr


@needs_openblas
def test_openblas_opt_out():
    result = run_python(
        f"import qkvshare_mlx; qkvshare_mlx.enable_openblas(); {_STATUS}",
        QKVSHARE_NO_OPENBLAS="1",
    )
    assert "'preloaded': False" in result.stdout, result.stderr
    assert "disabled by QKVSHARE_NO_OPENBLAS=1" in result.stdout


@needs_openblas
def test_openblas_after_mlx_is_reported_ineffective():
    result = run_python(
        f"import mlx.core, qkvshare_mlx; qkvshare_mlx.enable_openblas(); {_STATUS}"
    )
    assert "'effective': False" in result.stdout, result.stderr
    assert "preload ineffective" in result.stdout


@needs_openblas
def test_not_enabled_is_reported():
    result = run_python(f"import qkvshare_mlx; {_STATUS}")
    assert "'preloaded': False" in result.stdout, result.stderr
    assert "enable_openblas() was never called" in result.stdout


needs_numpy_openblas = pytest.mark.skipif(
    blas.numpy_blas_threads_now() is None,
    reason="numpy is not built on its bundled OpenBLAS",
)


@needs_numpy_openblas
def test_numpy_blas_threads_narrows_and_restores():
    before = blas.numpy_blas_threads_now()
    with blas.numpy_blas_threads(1):
        assert blas.numpy_blas_threads_now() == 1
        with blas.numpy_blas_threads(1):  # nested: the outer block restores
            assert blas.numpy_blas_threads_now() == 1
        assert blas.numpy_blas_threads_now() == 1
    assert blas.numpy_blas_threads_now() == before


@needs_numpy_openblas
def test_numpy_blas_threads_restores_after_an_error():
    before = blas.numpy_blas_threads_now()
    with pytest.raises(RuntimeError), blas.numpy_blas_threads(1):
        raise RuntimeError("boom")
    assert blas.numpy_blas_threads_now() == before


def test_numpy_blas_threads_is_a_no_op_without_numpys_openblas(monkeypatch):
    monkeypatch.setattr(blas, "_numpy_openblas", lambda: None)
    with blas.numpy_blas_threads(1):
        assert blas.numpy_blas_threads_now() is None
