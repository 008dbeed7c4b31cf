"""Give MLX's CPU backend a fast BLAS on Linux.

The ``mlx[cpu]`` wheel links the reference (netlib) BLAS, which runs an fp32 matmul
at a few GFLOP/s. Loading Debian's OpenBLAS with ``RTLD_GLOBAL`` *before* ``mlx`` is
first imported makes the dynamic linker resolve MLX's ``sgemm`` and friends to
OpenBLAS instead: no rebuild, no monkeypatching.

OpenBLAS picks its kernels from the CPU model at load time. Versions older than the
CPU (Debian 12 ships 0.3.21) do not know recent Xeons and fall back to the ``Prescott``
(SSE3) kernels, an order of magnitude below what the CPU can do. When the user has
not set ``OPENBLAS_CORETYPE`` we pick a core type from the CPU flags instead.

Nothing happens on import: :func:`enable_openblas` (also
``qkvshare_mlx.enable_openblas``) does it, and the CLI entry point, the bench
scripts and the test suite call it first thing. A library that uses
``qkvshare_mlx`` calls it before it imports ``mlx``, or starts Python with
``LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3``.
This module knows nothing about models or caches. It never imports ``mlx``.
Opt out with ``QKVSHARE_NO_OPENBLAS=1``. macOS is untouched (MLX uses Accelerate).

numpy's own BLAS (the OpenBLAS bundled in its Linux wheels, another library
than MLX's) is threaded too. :func:`numpy_blas_threads` narrows it for a
while, as ``threadpoolctl`` would: the receiver's decode threads each
multiply small row blocks, and a threaded BLAS under them, spinning between
calls, takes the cores the other decode thread and the model's forward need.
"""

import contextlib
import ctypes
import functools
import glob
import os
import platform
import sys
import threading
from pathlib import Path

OPT_OUT_ENV = "QKVSHARE_NO_OPENBLAS"

_MULTIARCH = {"x86_64": "x86_64-linux-gnu", "aarch64": "aarch64-linux-gnu"}

_state: dict = {
    "attempted": False,
    "path": None,
    "coretype": None,
    "coretype_source": None,
    "mlx_imported_first": False,
    "error": None,
}


def openblas_library_path() -> Path | None:
    """Debian's pthread OpenBLAS for this machine, or None if not applicable."""
    if not sys.platform.startswith("linux"):
        return None
    multiarch = _MULTIARCH.get(platform.machine())
    if multiarch is None:
        return None
    return Path(f"/usr/lib/{multiarch}/openblas-pthread/libblas.so.3")


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def pick_coretype(flags: set[str]) -> str | None:
    """OpenBLAS core type for x86 CPU flags, or None to let OpenBLAS decide.

    ``SkylakeX`` kernels need AVX-512 F/BW/VL/DQ/CD; ``Haswell`` kernels AVX2 + FMA.
    """
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"} <= flags:
        return "SkylakeX"
    if {"avx2", "fma"} <= flags:
        return "Haswell"
    return None


def enable_openblas() -> str | None:
    """Load OpenBLAS globally so that MLX, imported later, uses it.

    Idempotent. Does nothing on macOS, when ``QKVSHARE_NO_OPENBLAS=1``, or when the
    library is missing (install Debian's ``libopenblas0-pthread``).

    Returns:
        The path of the loaded library, or None when nothing was loaded.
    """
    if _state["attempted"]:
        return _state["path"]
    _state["attempted"] = True
    if os.environ.get(OPT_OUT_ENV, "") not in ("", "0"):
        return None
    path = openblas_library_path()
    if path is None or not path.exists():
        return None
    _state["mlx_imported_first"] = "mlx.core" in sys.modules

    # OpenBLAS reads OPENBLAS_CORETYPE once, while the library loads.
    user_coretype = os.environ.get("OPENBLAS_CORETYPE")
    coretype = user_coretype
    if user_coretype:
        _state["coretype_source"] = "OPENBLAS_CORETYPE"
    elif platform.machine() == "x86_64":
        coretype = pick_coretype(_cpu_flags())
        _state["coretype_source"] = "cpu flags" if coretype else "openblas autodetect"
    try:
        if coretype and not user_coretype:
            os.environ["OPENBLAS_CORETYPE"] = coretype
        ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    except OSError as e:
        _state["error"] = str(e)
        return None
    finally:
        # Keep the environment as we found it; child processes decide for themselves.
        if coretype and not user_coretype:
            os.environ.pop("OPENBLAS_CORETYPE", None)
    _state["path"] = str(path)
    _state["coretype"] = coretype
    return _state["path"]


def _loaded_corename() -> str | None:
    if _state["path"] is None:
        return None
    try:
        lib = ctypes.CDLL(_state["path"])
        lib.openblas_get_corename.restype = ctypes.c_char_p
        return lib.openblas_get_corename().decode()
    except (OSError, AttributeError):
        return None


def openblas_status() -> dict:
    """What the preload did, for ``qkvshare doctor``.

    ``effective`` is False when MLX had been imported before the preload: MLX's
    symbols were already bound to the reference BLAS, so the preload changes nothing.
    """
    preloaded = _state["path"] is not None
    if not _state["attempted"]:
        note = "enable_openblas() was never called (qkvshare_mlx.enable_openblas)"
    elif os.environ.get(OPT_OUT_ENV, "") not in ("", "0"):
        note = f"disabled by {OPT_OUT_ENV}=1"
    elif not sys.platform.startswith("linux"):
        note = "not Linux: MLX uses the platform BLAS"
    elif _state["error"]:
        note = f"loading OpenBLAS failed: {_state['error']}"
    elif not preloaded:
        note = (
            f"{openblas_library_path()} missing: apt-get install libopenblas0-pthread"
        )
    elif _state["mlx_imported_first"]:
        note = "mlx was imported before enable_openblas(): preload ineffective"
    else:
        note = "ok"
    return {
        "preloaded": preloaded,
        "effective": preloaded and not _state["mlx_imported_first"],
        "path": _state["path"],
        "coretype": _loaded_corename(),
        "coretype_source": _state["coretype_source"],
        "mlx_imported_first": _state["mlx_imported_first"],
        "note": note,
    }


def fast_cpu_matmul() -> bool:
    """Whether MLX's CPU matmul runs on an optimized BLAS: Accelerate on
    macOS, or the OpenBLAS preload here (not the wheel's reference BLAS,
    about 30x slower). Decides whether a dense product beats a transform
    written as element-wise passes on the CPU."""
    return sys.platform == "darwin" or openblas_status()["effective"]


@functools.lru_cache(maxsize=1)
def _numpy_openblas():
    """(get, set) of the thread count of numpy's bundled OpenBLAS, or None
    (numpy built against another BLAS: Accelerate, MKL, a system library).

    numpy 2's Linux wheels bundle ``libscipy_openblas64_`` (symbols
    ``scipy_openblas_*64_``), numpy 1's ``libopenblas64_p`` (``openblas_*64_``).
    """
    import numpy as np

    libs = Path(np.__file__).parent.parent / "numpy.libs"
    names = (
        "scipy_openblas_{}_num_threads64_",
        "scipy_openblas_{}_num_threads",
        "openblas_{}_num_threads64_",
        "openblas_{}_num_threads",
    )
    for path in sorted(glob.glob(str(libs / "lib*openblas*.so*"))):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in names:
            try:
                get = getattr(lib, name.format("get"))
                put = getattr(lib, name.format("set"))
            except AttributeError:
                continue
            get.restype, get.argtypes = ctypes.c_int, []
            put.restype, put.argtypes = None, [ctypes.c_int]
            return get, put
    return None


_limit_lock = threading.Lock()
# the blocks inside numpy_blas_threads now (their n), the count found by the
# first of them, and the count they applied
_limits: dict = {"active": [], "saved": None, "applied": None}


def numpy_blas_threads_now() -> int | None:
    """The thread count of numpy's bundled OpenBLAS, or None without one."""
    api = _numpy_openblas()
    return None if api is None else int(api[0]())


@contextlib.contextmanager
def numpy_blas_threads(n: int):
    """numpy's bundled OpenBLAS on at most ``n`` threads inside the block.

    The count is process-wide (OpenBLAS has no per-thread one), so this is
    a side effect on every thread of the process while the block runs.
    Overlapping blocks (nested or on other threads) share it: the smallest
    ``n`` of those inside applies, the first to enter saves the count, and
    the last to leave restores it, unless something else has changed the
    count meanwhile (then it is left alone). Does nothing where numpy uses
    another BLAS.
    """
    api = _numpy_openblas()
    if api is None:
        yield
        return
    get, put = api
    n = max(1, int(n))
    with _limit_lock:
        if not _limits["active"]:
            _limits["saved"] = _limits["applied"] = int(get())
        _limits["active"].append(n)
        _apply(put)
    try:
        yield
    finally:
        with _limit_lock:
            _limits["active"].remove(n)
            if _limits["active"]:
                _apply(put)
            elif int(get()) == _limits["applied"]:
                put(_limits["saved"])


def _apply(put) -> None:
    want = min(min(_limits["active"]), _limits["saved"])
    if want != _limits["applied"]:
        put(want)
        _limits["applied"] = want
