"""Builds fwpkm_ext._C with CMake + pybind11. No torch at build time.

Environment:
  FWPKM_CUDA=0|1|auto   compile the CUDA kernels (auto: when nvcc is found). 1 without nvcc fails.
  FWPKM_CUDA_ARCHS      CMake CUDA architectures, default "80;90".
  FWPKM_BUILD_JOBS      parallel build jobs (default: CPU count).
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _version() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    return re.search(r'^version\s*=\s*"([^"]+)"', text, re.M).group(1)


def _find_nvcc():
    for cand in (
        os.environ.get("CUDACXX"),
        shutil.which("nvcc"),
        os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"),
    ):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def _want_cuda():
    mode = os.environ.get("FWPKM_CUDA", "auto").strip().lower()
    if mode not in ("0", "1", "auto"):
        raise SystemExit(f"FWPKM_CUDA must be 0, 1 or auto, got {mode!r}")
    nvcc = _find_nvcc()
    if mode == "1" and nvcc is None:
        raise SystemExit(
            "FWPKM_CUDA=1 but no nvcc was found (looked at $CUDACXX, PATH, $CUDA_HOME/bin). "
            "Install a CUDA toolkit or build with FWPKM_CUDA=0."
        )
    return (mode != "0" and nvcc is not None), nvcc


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        cuda, nvcc = _want_cuda()
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        cmake = shutil.which("cmake")
        try:  # the cmake wheel from the build requirements, when present
            import cmake as cmake_pkg  # type: ignore

            cmake = os.path.join(cmake_pkg.CMAKE_BIN_DIR, "cmake")
        except ImportError:
            pass
        if cmake is None:
            raise SystemExit("cmake not found: pip install cmake")
        import pybind11

        args = [
            cmake, "-S", str(ROOT), "-B", str(build_dir),
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DFWPKM_VERSION={_version()}",
            f"-DFWPKM_CUDA={'ON' if cuda else 'OFF'}",
        ]
        if shutil.which("ninja") or _has_ninja_module():
            args += ["-G", "Ninja"]
        if cuda:
            args += [f"-DCMAKE_CUDA_COMPILER={nvcc}",
                     f"-DFWPKM_CUDA_ARCHS={os.environ.get('FWPKM_CUDA_ARCHS', '80;90')}"]
        print("fwpkm_ext build:", "CUDA + CPU" if cuda else "CPU only", flush=True)
        subprocess.check_call(args)
        jobs = os.environ.get("FWPKM_BUILD_JOBS", str(os.cpu_count() or 2))
        subprocess.check_call([cmake, "--build", str(build_dir), "--parallel", jobs])


def _has_ninja_module() -> bool:
    try:
        import ninja  # type: ignore  # noqa: F401

        return True
    except ImportError:
        return False


setup(
    packages=["fwpkm_ext", "fwpkm_ext.cli", "fwpkm_ext.integrations"],
    # the bundled default model (docs/RESULTS.md), under 20 MB
    package_data={"fwpkm_ext": ["default_model/*"]},
    ext_modules=[CMakeExtension("fwpkm_ext._C")],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
