"""The package list in pyproject.toml names every package, peftcore.kernels maps to kernels/, and
that folder never shadows the PyPI package ``kernels`` (which transformers imports)."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_listed():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "peftcore").rglob("__init__.py")}
    assert found | {"peftcore.kernels"} == listed
    # No __init__.py: the folder can only be a namespace portion, never a package that shadows another.
    assert not (ROOT / "kernels" / "__init__.py").exists()
    assert cfg["package-dir"]["peftcore.kernels"] == "kernels"


def test_kernels_import_as_peftcore_kernels_not_top_level():
    from importlib.metadata import distribution

    import peftcore.kernels

    assert [Path(p) for p in peftcore.kernels.__path__] == [ROOT / "kernels"]
    assert Path(__import__("peftcore.kernels.lora").kernels.lora.__file__).parent == ROOT / "kernels"
    top = distribution("peftcore").read_text("top_level.txt")
    assert top is not None and top.split() == ["peftcore"]


def _fake_site(tmp_path) -> Path:
    """A site folder holding a regular package ``kernels`` that stands for the installed one."""
    pkg = tmp_path / "site" / "kernels"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("WHO = 'installed'\nclass CUDAProperties: pass\n")
    return pkg.parent


def test_root_kernels_folder_never_shadows_an_installed_kernels(tmp_path):
    """The repository root first on sys.path (as under ``python -m pytest`` or ``python -m peftcore``
    run from it) with another ``kernels`` package installed: that one imports, and peftcore's Triton
    modules still import as peftcore.kernels."""
    import os
    import subprocess
    import sys

    code = (
        "import sys, kernels, peftcore.kernels.lora as lora\n"
        f"assert sys.path[0] == '', sys.path[:2]\n"
        "assert kernels.WHO == 'installed', kernels\n"
        "from kernels import CUDAProperties\n"
        f"assert lora.__file__.startswith({str(ROOT / 'kernels')!r}), lora.__file__\n"
        "print('ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(_fake_site(tmp_path)), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_transformers_kernels_integration_imports_in_this_suite():
    """The collision as CI met it: transformers' hub-kernels integration imports the installed
    ``kernels`` while this suite runs from the repository root."""
    import importlib.util

    spec = importlib.util.find_spec("kernels")
    if spec is None or spec.origin is None:  # only our namespace portion, or nothing: not installed
        from transformers.utils import import_utils

        assert not import_utils.is_kernels_available()
        return
    assert Path(spec.origin).resolve().parent != ROOT / "kernels"
    import transformers.integrations.hub_kernels  # noqa: F401  (failed with the folder a package)


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
