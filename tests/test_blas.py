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


@pytest.fixture
def two_threads():
    """numpy's BLAS on 2 threads for the test (so narrowing it shows),
    restored after."""
    get, put = blas._numpy_openblas()
    before = get()
    put(2)
    yield
    put(before)


@needs_numpy_openblas
def test_numpy_blas_threads_narrows_and_restores(two_threads):
    with blas.numpy_blas_threads(1):
        assert blas.numpy_blas_threads_now() == 1
        with blas.numpy_blas_threads(1):  # nested: the outer block restores
            assert blas.numpy_blas_threads_now() == 1
        assert blas.numpy_blas_threads_now() == 1
    assert blas.numpy_blas_threads_now() == 2


@needs_numpy_openblas
def test_numpy_blas_threads_restores_after_an_error(two_threads):
    with pytest.raises(RuntimeError), blas.numpy_blas_threads(1):
        raise RuntimeError("boom")
    assert blas.numpy_blas_threads_now() == 2


@needs_numpy_openblas
def test_overlapping_blocks_keep_the_smallest_limit(two_threads):
    outer = blas.numpy_blas_threads(1)
    inner = blas.numpy_blas_threads(2)
    outer.__enter__()
    inner.__enter__()  # a wider block inside does not widen the narrow one
    assert blas.numpy_blas_threads_now() == 1
    outer.__exit__(None, None, None)  # not nested: the outer leaves first
    assert blas.numpy_blas_threads_now() == 2
    inner.__exit__(None, None, None)
    assert blas.numpy_blas_threads_now() == 2


@needs_numpy_openblas
def test_a_count_changed_inside_the_block_is_left_alone(two_threads):
    get, put = blas._numpy_openblas()
    with blas.numpy_blas_threads(1):
        put(3)  # the user (or threadpoolctl) changed it meanwhile
    assert blas.numpy_blas_threads_now() == 3


def test_numpy_blas_threads_is_a_no_op_without_numpys_openblas(monkeypatch):
    monkeypatch.setattr(blas, "_numpy_openblas", lambda: None)
    with blas.numpy_blas_threads(1):
        assert blas.numpy_blas_threads_now() is None
