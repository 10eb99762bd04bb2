"""Where CTranslate2's CUDA 12 cuBLAS is loaded from (pipeline.asr.cuda_libs). The real load needs
the nvidia-cublas-cu12 wheel and a GPU box; here the path logic runs on directories laid out as
the wheel lays them out, and the loader is a recorder."""

from pathlib import Path

import pytest

from pipeline.asr import cuda_libs
from pipeline.asr.factory import build_engine
from pipeline.asr.warmup import EngineStartError
from pipeline.core.settings import AsrSettings


def wheel(root: Path, names=("libcublasLt.so.12", "libcublas.so.12", "libnvblas.so.12")) -> Path:
    lib = root / "nvidia" / "cublas" / "lib"
    lib.mkdir(parents=True)
    for name in names:
        (lib / name).write_bytes(b"\x7fELF")
    return lib


def test_cublas_lt_loads_before_cublas_from_the_wheels_lib_dir(tmp_path):
    lib = wheel(tmp_path)
    loaded = []
    files = cuda_libs.preload_cublas([tmp_path / "elsewhere", lib], load=loaded.append)
    assert files == loaded == [lib / "libcublasLt.so.12", lib / "libcublas.so.12"]


def test_a_directory_missing_a_library_is_passed_over(tmp_path):
    partial = wheel(tmp_path / "a", names=("libcublas.so.12",))
    whole = wheel(tmp_path / "b")
    assert cuda_libs.cublas_files([partial, whole]) == [whole / "libcublasLt.so.12", whole / "libcublas.so.12"]
    loaded = []
    assert cuda_libs.preload_cublas([partial], load=loaded.append) == [] and loaded == []


def test_the_wheel_is_found_where_python_imports_it(tmp_path, monkeypatch):
    import sys

    lib = wheel(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    # The fake ``nvidia`` namespace package this imports must not outlive the test: a later
    # test on "cuda" would find its empty libraries (monkeypatch restores sys.path, not modules).
    for name in ("nvidia", "nvidia.cublas"):
        monkeypatch.setitem(sys.modules, name, None)
        monkeypatch.delitem(sys.modules, name)
    assert lib in cuda_libs.wheel_library_dirs()


def test_cuda_ctranslate2_preloads_before_the_engine_loads(monkeypatch):
    """The factory loads cuBLAS for CTranslate2 on CUDA before the engine (it fails here after
    that: this machine has no GPU), and never on the CPU."""
    order = []
    monkeypatch.setattr(cuda_libs, "preload_cublas", lambda: order.append("preload") or [])
    with pytest.raises(EngineStartError) as info:
        build_engine(AsrSettings(model="whisper-tiny.en", device="cuda", compute_type="float16"))
    assert order == ["preload"]
    assert "could not load" in str(info.value) and "Fix:" in str(info.value), str(info.value)
    with pytest.raises(EngineStartError, match="no_such_type"):  # on the CPU: fails at load, never preloads
        build_engine(AsrSettings(model="whisper-tiny.en", compute_type="no_such_type"))
    assert order == ["preload"]
