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
