from pathlib import Path

import pytest
from conftest import run_python


def test_import_pulls_in_neither_torch_nor_mlx():
    result = run_python(
        "import sys, qkvshare_mlx; "
        "heavy = [m for m in ('torch', 'transformers', 'mlx') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    assert result.returncode == 0, result.stderr


def test_import_has_no_side_effects():
    # no native library mapped, no environment variable changed
    result = run_python(
        "import os, sys; before = dict(os.environ); import qkvshare_mlx; "
        "assert 'mlx.core' not in sys.modules; "
        "maps = open('/proc/self/maps').read() if sys.platform == 'linux' else ''; "
        "assert 'openblas' not in maps, 'OpenBLAS mapped on import'; "
        "assert dict(os.environ) == before, 'environment changed'"
    )
    assert result.returncode == 0, result.stderr


def test_errors_and_converters_import_without_mlx():
    result = run_python(
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


def test_converters_package_maps_to_repo_folder():
    import qkvshare_converters

    assert Path(qkvshare_converters.__file__).parent.name == "converters"
