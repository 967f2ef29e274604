"""Build script: metadata lives in pyproject.toml; this file only builds the extension peftcore._C.

The extension is built by CMake (CMakeLists.txt, sources in csrc/) and is optional: when it cannot
be built the package still installs (pure Python, ops run on the reference path) and the reason is
written to ``peftcore/_build_info.json``, which ``peftcore info`` prints.  torch is never imported
here: the extension takes tensors as DLPack capsules and links no libtorch.

Environment variables (all optional):

==========================  =====================================================================
PEFTCORE_NO_EXT=1           skip the extension entirely
PEFTCORE_CUDA=0             build without the CUDA kernels (default: on when nvcc is found)
PEFTCORE_CUDA_ARCHS         CUDA architectures, CMake syntax (default "80;90")
PEFTCORE_NATIVE_ARCH=0      compile the CPU kernels without -march=native (portable binaries)
PEFTCORE_REQUIRE_EXT=1      fail the install instead of falling back when the build fails (CI)
PEFTCORE_REQUIRE_CUDA=1     fail the install when nvcc is found but the CUDA kernels do not compile
PEFTCORE_BUILD_JOBS         parallel compile jobs (default: CPU count)
PEFTCORE_SANITIZE=address   compile the CPU code with -fsanitize=address (preload libasan to import
                            it; .ci/asan does this in a temporary copy)
CUDACXX / CUDA_HOME         where nvcc is
==========================  =====================================================================
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
INFO_NAME = "_build_info.json"
DEFAULT_ARCHS = "80;90"


def _flag(name: str, default: bool) -> bool:
    v = os.environ.get(name)
    if v is None or v.strip() == "":
        return default
    return v.strip().lower() not in ("0", "false", "off", "no")


def _find_cmake() -> str | None:
    exe = shutil.which("cmake")
    if exe:
        return exe
    try:  # the `cmake` wheel, if the build environment has it
        import cmake  # type: ignore

        cand = Path(cmake.CMAKE_BIN_DIR) / "cmake"
        return str(cand) if cand.exists() else None
    except Exception:
        return None


def _find_ninja() -> str | None:
    exe = shutil.which("ninja")
    if exe:
        return exe
    try:
        import ninja  # type: ignore

        cand = Path(ninja.BIN_DIR) / "ninja"
        return str(cand) if cand.exists() else None
    except Exception:
        return None


def _find_nvcc() -> str | None:
    cands = [os.environ.get("CUDACXX")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            cands.append(os.path.join(os.environ[var], "bin", "nvcc"))
    cands += [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    for c in cands:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def _tail(text: str, n: int = 25) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return "\n".join(lines[-n:])


class _BuildFailed(RuntimeError):
    pass


class _Required(RuntimeError):
    """A build failure that PEFTCORE_REQUIRE_EXT / PEFTCORE_REQUIRE_CUDA turn into an install error."""


class CMakeExtension(Extension):
    """An extension whose sources CMake compiles; optional so a failed build does not stop install."""

    def __init__(self, name: str):
        super().__init__(name, sources=[], optional=True)


class CMakeBuild(build_ext):
    """Runs CMake for CMakeExtension; records what it built (or why not) in _build_info.json."""

    def run(self):
        self._info = {
            "built": False,
            "reason": None,
            "cuda": False,
            "cuda_reason": None,
            "cuda_archs": [],
            "python": platform.python_version(),
            "platform": sysconfig.get_platform(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        # Editable installs (and --inplace) import the package from the source tree.
        inplace = bool(self.inplace or getattr(self, "editable_mode", False))
        exts = list(self.extensions)
        for ext in exts:  # a module left by an earlier build must not ship if this one fails
            stale = os.path.join(self.build_lib, self.get_ext_filename(self.get_ext_fullname(ext.name)))
            if os.path.exists(stale):
                os.remove(stale)
        if _flag("PEFTCORE_NO_EXT", False):
            self._info["reason"] = "skipped: PEFTCORE_NO_EXT=1"
            self._info["cuda_reason"] = "extension skipped"
            self.extensions = []
        super().run()
        if inplace and not self._info["built"]:
            self._remove_stale_inplace(exts)
        self._write_info(inplace)

    def _remove_stale_inplace(self, exts) -> None:
        # A module left in the source tree by an earlier build would load despite this failure.
        build_py = self.get_finalized_command("build_py")
        for ext in exts:
            try:
                inplace_file, _ = self._get_inplace_equivalent(build_py, ext)
            except Exception:  # private setuptools helper; best effort
                continue
            if os.path.exists(inplace_file):
                os.remove(inplace_file)

    def build_extension(self, ext):
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        info = self._info
        want_cuda = _flag("PEFTCORE_CUDA", True)
        nvcc = _find_nvcc() if want_cuda else None
        if not want_cuda:
            info["cuda_reason"] = "disabled by PEFTCORE_CUDA=0"
        elif nvcc is None:
            info["cuda_reason"] = "nvcc not found (set CUDACXX or CUDA_HOME, or put nvcc on PATH)"
        t0 = time.time()
        try:
            try:
                cm = self._cmake(ext, nvcc)
            except _BuildFailed as e:
                if nvcc is None:
                    raise
                if _flag("PEFTCORE_REQUIRE_CUDA", False):
                    raise _Required(f"CUDA build failed (PEFTCORE_REQUIRE_CUDA=1):\n{e}") from None
                # The CPU kernels alone are worth having: retry without CUDA, keep the CUDA error.
                info["cuda_reason"] = f"CUDA build failed with {nvcc}:\n{e}"
                print(f"peftcore: CUDA build failed, retrying without CUDA:\n{e}", file=sys.stderr)
                cm = self._cmake(ext, None)
        except _Required:
            raise
        except Exception as e:  # never let the optional extension stop the install
            if not isinstance(e, _BuildFailed):
                e = _BuildFailed(f"{type(e).__name__}: {e}")
            info["reason"] = str(e)
            info["cuda_reason"] = "extension not built"
            print(f"peftcore: building peftcore._C failed; installing without it.\n{e}", file=sys.stderr)
            if _flag("PEFTCORE_REQUIRE_EXT", False):
                raise RuntimeError(f"peftcore._C failed to build (PEFTCORE_REQUIRE_EXT=1):\n{e}") from None
            return
        info["built"] = True
        info["build_seconds"] = round(time.time() - t0, 1)
        info["cuda"] = bool(cm.get("cuda"))
        if info["cuda"]:
            info["cuda_reason"] = None
            info["cuda_archs"] = [a for a in str(cm.get("cuda_archs", "")).split(";") if a]
            info["cuda_compiler"] = f"nvcc {cm.get('cuda_compiler_version', '')}".strip()
        elif not info["cuda_reason"]:
            info["cuda_reason"] = cm.get("cuda_reason") or "CMake did not enable CUDA"
        for key in ("cxx_compiler", "openmp", "openmp_version", "march", "cmake_version", "sanitize"):
            info[key] = cm.get(key)

    def _cmake(self, ext, nvcc: str | None) -> dict:
        cmake = _find_cmake()
        if cmake is None:
            raise _BuildFailed("cmake not found (install cmake >= 3.18, e.g. `pip install cmake`)")
        try:
            import pybind11
        except ImportError:
            raise _BuildFailed("pybind11 is not importable in the build environment") from None
        out_path = Path(self.get_ext_fullpath(ext.name)).resolve()
        out_dir = out_path.parent
        out_dir.mkdir(parents=True, exist_ok=True)
        suffix = out_path.name[len(ext.name.split(".")[-1]) :]
        sanitize = os.environ.get("PEFTCORE_SANITIZE", "").strip()
        build_dir = Path(self.build_temp).resolve() / (("cmake-cuda" if nvcc else "cmake-cpu") + (f"-{sanitize}" if sanitize else ""))
        build_dir.mkdir(parents=True, exist_ok=True)
        info_file = build_dir / "peftcore_build.json"
        if info_file.exists():
            info_file.unlink()
        args = [
            cmake,
            "-S", str(ROOT),
            "-B", str(build_dir),
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DPEFTCORE_OUTPUT_DIR={out_dir}",
            f"-DPEFTCORE_EXT_SUFFIX={suffix}",
            f"-DPEFTCORE_INFO_FILE={info_file}",
            f"-DPEFTCORE_NATIVE_ARCH={'ON' if _flag('PEFTCORE_NATIVE_ARCH', True) else 'OFF'}",
            f"-DPEFTCORE_SANITIZE={sanitize}",
        ]
        if nvcc:
            archs = os.environ.get("PEFTCORE_CUDA_ARCHS", "").strip().replace(",", ";") or DEFAULT_ARCHS
            args += ["-DPEFTCORE_CUDA=ON", f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-DPEFTCORE_CUDA_ARCHS={archs}"]
        else:
            args += ["-DPEFTCORE_CUDA=OFF"]
        cache = build_dir / "CMakeCache.txt"
        ninja = _find_ninja()
        if ninja and not cache.exists():
            args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        jobs = os.environ.get("PEFTCORE_BUILD_JOBS") or str(os.cpu_count() or 1)
        try:
            self._run(args, "CMake configure")
            self._run([cmake, "--build", str(build_dir), "--config", "Release", "--parallel", jobs], "CMake build")
        except _BuildFailed:
            # A failed configure caches its bad choices (compiler, flags): start clean next time.
            shutil.rmtree(build_dir, ignore_errors=True)
            raise
        if not out_path.exists():
            raise _BuildFailed(f"CMake finished but {out_path} was not produced")
        try:
            return json.loads(info_file.read_text())
        except Exception as e:  # the module exists; the summary is a nicety
            return {"cuda": nvcc is not None, "summary_error": repr(e)}

    @staticmethod
    def _run(cmd: list[str], what: str) -> None:
        print("peftcore:", " ".join(cmd), flush=True)
        try:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        except OSError as e:
            raise _BuildFailed(f"{what} could not start: {e}") from None
        print(proc.stdout, flush=True)
        if proc.returncode != 0:
            raise _BuildFailed(f"{what} failed (exit {proc.returncode}):\n{_tail(proc.stdout)}")

    def _write_info(self, inplace: bool) -> None:
        text = json.dumps(self._info, indent=2, sort_keys=True) + "\n"
        targets = [Path(self.build_lib) / "peftcore" / INFO_NAME]
        if inplace:
            build_py = self.get_finalized_command("build_py")
            targets.append(Path(build_py.get_package_dir("peftcore")) / INFO_NAME)
        for t in targets:
            t.parent.mkdir(parents=True, exist_ok=True)
            t.write_text(text)

    def get_outputs(self):
        # A failed optional build leaves no module behind: do not claim one.
        return [o for o in super().get_outputs() if os.path.exists(o)]


setup(ext_modules=[CMakeExtension("peftcore._C")], cmdclass={"build_ext": CMakeBuild})
