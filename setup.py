"""Build driver: setuptools hands the extension to CMake (as vLLM does).

Environment knobs:
  SHADOWKV_CUDA        ON | OFF | AUTO (default AUTO: CUDA kernels when nvcc is found; also TRUE/YES/1, FALSE/NO/0)
  SHADOWKV_CUDA_ARCHS  compute capabilities, default "9.0a;8.0"
  CUTLASS_DIR          CUTLASS root with include/cute (default: the nvidia-cutlass package)
  MAX_JOBS             parallel compile jobs (default: CPU count)
  SHADOWKV_BUILD_TYPE  CMake build type (default Release)
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import setuptools
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent

# pyproject.toml's SPDX `license = "Apache-2.0"` needs setuptools 77; an older one (which
# --no-build-isolation builds take from the environment) fails with an unreadable schema error.
if int(setuptools.__version__.split(".")[0]) < 77:
    sys.exit(f"shadowkv: building needs setuptools>=77 (pyproject.toml's license field), found "
             f"{setuptools.__version__}: pip install -U 'setuptools>=77'")


def _configured_for(build_dir, key):
    """Forget a CMake cache that was configured by another interpreter or toolchain.

    build/cmake-<tag> is shared by every venv of one Python version. Its cache keeps absolute
    paths (the ninja binary, torch's libraries found by find_library, pybind11's config) of the
    venv that configured it first; after that venv is deleted every later build fails in
    `project()` ("ninja: no such file"), and with both venvs present _C would link the other
    venv's torch. Dropping CMakeCache.txt (and the compiler checks under CMakeFiles/<version>/)
    makes CMake look again. The object files (CMakeFiles/<target>.dir/) stay: those whose compile
    command is unchanged are not rebuilt (the ones that include the other venv's torch headers
    are). The stamp goes with the cache and is written back only after a configure succeeds, so
    a failed one cannot leave another venv's cache behind a matching stamp.
    """
    stamp = build_dir / "shadowkv-configured-for.txt"
    cache = build_dir / "CMakeCache.txt"
    if cache.exists() and (not stamp.exists() or stamp.read_text() != key):
        stamp.unlink(missing_ok=True)
        cache.unlink()
        for checks in (build_dir / "CMakeFiles").glob("[0-9]*.[0-9]*"):  # e.g. CMakeFiles/4.1.2/
            shutil.rmtree(checks, ignore_errors=True)
    return stamp


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        # A fixed folder, not build_temp, so rebuilds (pip install -e . again) are incremental.
        build_dir = ROOT / "build" / f"cmake-{sys.implementation.cache_tag}"
        build_dir.mkdir(parents=True, exist_ok=True)
        args = [
            f"-DCMAKE_BUILD_TYPE={os.environ.get('SHADOWKV_BUILD_TYPE', 'Release')}",
            f"-DCMAKE_PREFIX_PATH={pybind11.get_cmake_dir()}",
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-DSHADOWKV_PYTHON_OUTPUT_DIR={out_dir}",
            f"-DSHADOWKV_CUDA={os.environ.get('SHADOWKV_CUDA', 'AUTO')}",
            f"-DSHADOWKV_CUDA_ARCHS={os.environ.get('SHADOWKV_CUDA_ARCHS', '9.0a;8.0')}",
            # Empty: CMakeLists.txt asks Python3_EXECUTABLE for the nvidia-cutlass package's headers.
            f"-DCUTLASS_DIR={os.environ.get('CUTLASS_DIR', '')}",
        ]
        try:
            import ninja  # noqa: F401  (the pip package puts the binary on PATH)

            args.append("-GNinja")
        except ImportError:
            pass
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        import torch

        key = "\n".join([sys.executable, torch.__file__, pybind11.get_cmake_dir(),
                         shutil.which("ninja") or "", shutil.which("cmake") or ""]) + "\n"
        stamp = _configured_for(build_dir, key)
        subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build_dir), *args], check=True)
        stamp.write_text(key)
        subprocess.run(["cmake", "--build", str(build_dir), "--target", "_C", "-j", jobs], check=True)


setup(ext_modules=[CMakeExtension("shadowkv._C")], cmdclass={"build_ext": CMakeBuild})
