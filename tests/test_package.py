import subprocess
import sys
from pathlib import Path

import pytest

from qkvshare_mlx import _blas


def _python(code: str, **env) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )


def test_import_pulls_in_neither_torch_nor_mlx():
    result = _python(
        "import sys, qkvshare_mlx; "
        "heavy = [m for m in ('torch', 'transformers', 'mlx') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    assert result.returncode == 0, result.stderr


def test_errors_and_converters_import_without_mlx():
    result = _python(
        "import sys, qkvshare_mlx.errors, qkvshare_converters; "
        "import qkvshare_converters.gguf_model, qkvshare_converters.hf_model; "
        "heavy = [m for m in ('torch', 'transformers', 'mlx') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    assert result.returncode == 0, result.stderr


def test_lazy_public_names():
    import qkvshare_mlx
    from qkvshare_mlx import errors, models

    assert qkvshare_mlx.ModelLoadError is errors.ModelLoadError
    assert qkvshare_mlx.load_model is models.load_model
    assert qkvshare_mlx.default_model_path is models.default_model_path
    assert qkvshare_mlx.__version__ == "0.1.0"
    with pytest.raises(AttributeError, match="no_such_name"):
        qkvshare_mlx.no_such_name  # noqa: B018


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


def test_pick_coretype_from_flags():
    avx512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd", "avx2", "fma"}
    assert _blas.pick_coretype(avx512) == "SkylakeX"
    assert _blas.pick_coretype({"avx2", "fma", "sse4_2"}) == "Haswell"
    assert _blas.pick_coretype({"sse4_2"}) is None


_STATUS = "from qkvshare_mlx._blas import openblas_status as s; print(s())"
needs_openblas = pytest.mark.skipif(
    _blas.openblas_library_path() is None or not _blas.openblas_library_path().exists(),
    reason="Debian OpenBLAS (libopenblas0-pthread) not installed",
)


@needs_openblas
def test_openblas_preloaded_on_import():
    result = _python(f"import qkvshare_mlx; {_STATUS}")
    assert "'preloaded': True, 'effective': True" in result.stdout, result.stderr


@needs_openblas
def test_openblas_opt_out():
    result = _python(f"import qkvshare_mlx; {_STATUS}", QKVSHARE_NO_OPENBLAS="1")
    assert "'preloaded': False" in result.stdout, result.stderr
    assert "disabled by QKVSHARE_NO_OPENBLAS=1" in result.stdout


@needs_openblas
def test_openblas_after_mlx_is_reported_ineffective():
    result = _python(f"import mlx.core, qkvshare_mlx; {_STATUS}")
    assert "'effective': False" in result.stdout, result.stderr
    assert "preload ineffective" in result.stdout


def test_converters_package_maps_to_repo_folder():
    import qkvshare_converters

    assert Path(qkvshare_converters.__file__).parent.name == "converters"
