"""Nothing at the repository root stands in for an installed package when a script runs from there.

`python train.py` puts the root first on sys.path, so a folder `kernels/` there was imported by transformers 5.25
(which depends on PyPI's `kernels`) in place of its own, and train.py failed at its first import.
"""

from __future__ import annotations

import importlib.machinery
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Root scripts whose names are installed packages too, with why that is harmless.
SHADOWING_SCRIPTS = {
    "evaluate": "Hugging Face's evaluate, imported only by some lm-eval tasks; moelora.lm_eval moves the root last",
}


def _installed_elsewhere(name: str) -> str | None:
    """Where `import name` resolves with the repository root off sys.path (None: nowhere)."""
    path = [p for p in sys.path if Path(p or ".").resolve() != ROOT]
    spec = importlib.machinery.PathFinder.find_spec(name, path)
    return spec.origin if spec is not None and spec.origin else None


def _run_at_root(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_no_root_package_shadows_an_installed_one():
    packages = [d.name for d in ROOT.iterdir() if (d / "__init__.py").is_file()]
    assert packages == ["moelora"], f"packages at the repository root: {packages} (put them under moelora/)"
    for name in [d.name for d in ROOT.iterdir() if d.is_dir() and not d.name.startswith(".")]:
        origin = _installed_elsewhere(name)
        assert origin is None or Path(origin).resolve().is_relative_to(ROOT / name), (
            f"the folder {name}/ at the repository root would shadow the installed {origin}")


def test_root_scripts_shadow_only_known_packages():
    for script in ROOT.glob("*.py"):
        origin = _installed_elsewhere(script.stem)
        assert origin is None or script.stem in SHADOWING_SCRIPTS, (
            f"{script.name} at the repository root would shadow the installed {origin}")


@pytest.mark.slow
def test_transformers_imports_from_the_repository_root():
    done = _run_at_root("from transformers import Trainer, get_scheduler; import moelora.kernels")
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.slow
def test_lm_eval_cli_finds_hugging_face_evaluate_not_our_script():
    if _installed_elsewhere("evaluate") is None:
        pytest.skip("Hugging Face evaluate is not installed (it comes with lm-eval)")
    done = _run_at_root("import moelora.lm_eval as m, sys; m._repository_root_last(); import evaluate, moelora.plots;"
                        " print(evaluate.__file__)")
    assert done.returncode == 0, done.stderr[-2000:]
    assert Path(done.stdout.strip()).resolve() != ROOT / "evaluate.py"
