"""The error hierarchy: every project error is an InputError or a StepError; the CLI's exit code
follows the hierarchy; ``python -m deploycompress`` is the console script."""

import importlib
import pkgutil
import subprocess
import sys

import pytest

import deploycompress
from deploycompress.errors import DeployCompressError, InputError, MaskError, StepError, exit_code


def _project_classes(warnings: bool = False):
    """Every exception class (or, with ``warnings``, every Warning class) the deploycompress modules define."""
    found = {}
    for info in pkgutil.walk_packages(deploycompress.__path__, "deploycompress."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for obj in vars(module).values():
            if isinstance(obj, type) and issubclass(obj, BaseException) and issubclass(obj, Warning) == warnings and obj.__module__.split(".")[0] == "deploycompress":
                # (deploycompress_device is the torch-free device package: its errors stay its own)
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return found


def _project_exceptions():
    return _project_classes()


def test_every_named_warning_is_in_the_errors_page():
    """docs/errors.md's table of named warnings lists every Warning class the package defines, with its module."""
    from pathlib import Path

    page = (Path(__file__).parent.parent / "docs" / "errors.md").read_text()
    table = page[page.index("## Named warnings"):]
    found = _project_classes(warnings=True)
    assert len(found) >= 15, sorted(found)  # the walk really found the classes
    missing = sorted(n for n, c in found.items() if f"| `{c.__name__}`" not in table or f"`{c.__module__}`" not in table)
    assert missing == []


def test_every_project_error_is_an_input_or_step_error():
    found = _project_exceptions()
    assert len(found) >= 15, sorted(found)  # the walk really found the classes
    # private control-flow exceptions (leading underscore) never reach the user
    stray = sorted(n for n, c in found.items() if not c.__name__.startswith("_") and c not in (DeployCompressError, InputError, StepError)
                   and not issubclass(c, (InputError, StepError)))
    assert stray == []


@pytest.mark.parametrize("name, builtin", [
    ("ConfigError", ValueError), ("CalibConfigError", ValueError), ("EngineError", ValueError), ("BundleError", RuntimeError),
    ("BackendError", RuntimeError), ("ExportError", RuntimeError), ("NameMapError", LookupError), ("MaskError", ValueError),
])
def test_builtin_bases_are_kept(name, builtin):
    assert issubclass(getattr(deploycompress, name), builtin)


def test_one_mask_error():
    from deploycompress.pruning import io
    from deploycompress.speedup import masks

    assert io.MaskError is masks.MaskError is MaskError is deploycompress.MaskError


def test_exit_codes_follow_the_hierarchy():
    assert exit_code(deploycompress.ConfigError("x")) == 2
    assert exit_code(deploycompress.BackendInputError("x")) == 2
    assert exit_code(deploycompress.BackendError("x")) == 1
    assert exit_code(deploycompress.BuildStepError("x")) == 1
    assert exit_code(KeyError("x")) == 1


def test_python_dash_m_is_the_console_script(tmp_path):
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    proc = subprocess.run([sys.executable, "-m", "deploycompress", "inspect", str(empty)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "empty.onnx" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "deploycompress", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "build" in proc.stdout
