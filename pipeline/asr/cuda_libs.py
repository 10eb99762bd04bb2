"""CUDA 12 cuBLAS for CTranslate2 on GPUs, from the ``nvidia-cublas-cu12`` wheel.

The ctranslate2 4.8 wheel links the CUDA runtime statically and opens ``libcublas.so.12`` with
``dlopen`` at its first matrix product on a GPU (it needs no cuDNN, and NCCL only for tensor
parallelism). torch 2.13 from PyPI brings CUDA 13's cuBLAS (``libcublas.so.13``), which does not
satisfy it, and the wheel's directory is not on the loader's path: ``LD_LIBRARY_PATH`` is read
once, when the process starts, so setting it from Python is too late. Instead the libraries are
loaded here, by full path and ``RTLD_GLOBAL``, before the engine loads: a later
``dlopen("libcublas.so.12")`` finds the already loaded library by its soname.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
from collections.abc import Iterable
from pathlib import Path

logger = logging.getLogger(__name__)

# In load order: libcublas.so.12 needs libcublasLt.so.12.
CUBLAS_12 = ("libcublasLt.so.12", "libcublas.so.12")


def wheel_library_dirs() -> list[Path]:
    """``…/site-packages/nvidia/cublas/lib`` of each installed ``nvidia-cublas-cu12`` (usually one)."""
    try:
        spec = importlib.util.find_spec("nvidia.cublas")
    except ModuleNotFoundError:  # no ``nvidia`` namespace package at all
        return []
    if spec is None or not spec.submodule_search_locations:
        return []
    return [Path(p) / "lib" for p in spec.submodule_search_locations if (Path(p) / "lib").is_dir()]


def cublas_files(dirs: Iterable[Path], names: Iterable[str] = CUBLAS_12) -> list[Path]:
    """The full paths to load, in ``names`` order, from the first directory holding all of them;
    [] when none does."""
    names = list(names)
    for directory in dirs:
        files = [directory / n for n in names]
        if all(f.is_file() for f in files):
            return files
    return []


def preload_cublas(dirs: Iterable[Path] | None = None,
                   load=lambda path: ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)) -> list[Path]:
    """Load CUDA 12 cuBLAS from the wheel, if installed, before CTranslate2 needs it; the files
    loaded. Without the wheel nothing is loaded (a system CUDA 12 on the loader's path may serve;
    if none does, the engine's warm-up decode fails at start and says what to install)."""
    files = cublas_files(wheel_library_dirs() if dirs is None else dirs)
    if not files:
        logger.info("nvidia-cublas-cu12 is not installed: CTranslate2 looks for libcublas.so.12 on the loader's path")
        return []
    for path in files:
        load(path)
    logger.info("Loaded CUDA 12 cuBLAS for CTranslate2 from %s", files[0].parent)
    return files
