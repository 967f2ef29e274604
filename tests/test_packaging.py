"""The package list in pyproject.toml names every package, and peftcore.kernels maps to kernels/."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_listed():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "peftcore").rglob("__init__.py")}
    found |= {"peftcore.kernels"} if (ROOT / "kernels" / "__init__.py").exists() else set()
    assert found == listed
    assert cfg["package-dir"]["peftcore.kernels"] == "kernels"


def test_kernels_import_as_peftcore_kernels_not_top_level():
    from importlib.metadata import distribution

    import peftcore.kernels

    assert Path(peftcore.kernels.__file__).parent == ROOT / "kernels"
    top = distribution("peftcore").read_text("top_level.txt")
    assert top is not None and top.split() == ["peftcore"]


def test_installs_and_runs_without_the_extension(tmp_path):
    """A wheel built with the extension off installs, runs lora_linear on the reference path, and says why."""
    import os
    import shutil
    import subprocess
    import sys

    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        "build", "*.so", ".git", "_build_info.json", "*.egg-info", ".hypothesis", "__pycache__", "results"))
    env = {**os.environ, "PEFTCORE_NO_EXT": "1"}
    env.pop("PEFTCORE_REQUIRE_EXT", None)
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-build-isolation", "--no-deps", "-w", str(tmp_path / "w"), str(src)],
                   env=env, check=True, capture_output=True)
    (wheel,) = (tmp_path / "w").glob("peftcore-*.whl")
    names = __import__("zipfile").ZipFile(wheel).namelist()
    assert "peftcore/kernels/lora.py" in names and not any(n.startswith("kernels/") for n in names)
    assert not any("/_C." in n for n in names)
    # A bare venv that sees torch & co. through PYTHONPATH: .pth files there are not run, so an
    # editable install of this checkout cannot lend the venv its compiled peftcore._C.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "v")], check=True)
    py = tmp_path / "v" / "bin" / "python"
    site = os.path.dirname(os.path.dirname(torch_file()))
    venv_env = {**os.environ, "PYTHONPATH": site}
    venv_env.pop("PEFTCORE_BACKEND", None)
    subprocess.run([*pip, "install", "--no-deps", "--target", run_site(py), str(wheel)], check=True, capture_output=True)
    code = (
        "import torch, peftcore, peftcore.backends as b; from peftcore.info import report\n"
        f"assert peftcore.__file__.startswith({run_site(py)!r}), peftcore.__file__\n"
        "x, w, a, bb = torch.randn(3, 4), torch.randn(5, 4), torch.randn(2, 4), torch.randn(5, 2)\n"
        "y = peftcore.ops.lora_linear(x, w, None, a, bb, 1.0, dropout_p=0.1, seed=1)\n"
        "assert y.shape == (3, 5) and b.select('lora_linear', 'cpu', torch.float32) == 'reference'\n"
        "print(report())\n"
    )
    out = subprocess.run([str(py), "-c", code], cwd=tmp_path, capture_output=True, text=True, env=venv_env)
    assert out.returncode == 0, out.stderr
    assert "peftcore._C not built" in out.stdout and "PEFTCORE_NO_EXT=1" in out.stdout


def torch_file():
    import torch

    return torch.__file__


def run_site(py):
    import subprocess

    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    return subprocess.run([str(py), "-I", "-c", code], capture_output=True, text=True, check=True).stdout.strip()
