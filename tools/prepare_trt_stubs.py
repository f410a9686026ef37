"""Make the installed ``tensorrt-stubs`` usable by mypy; print the folder to put on ``MYPYPATH``.

``tensorrt-stubs`` (PyPI, 10.13.0.35.1) installs ``tensorrt/__init__.pyi`` and ``tensorrt_bindings/*.pyi``
without a ``py.typed`` marker, so mypy skips them ("missing library stubs") and every TensorRT call
would pass unchecked; and two generated signatures are not valid Python (a parameter named ``in``,
a parameter without default after defaulted ones). This copies the stubs to ``OUT`` and mends those
two spellings only, so ``make typecheck`` checks calls against TensorRT's real signatures.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import sys
from pathlib import Path

OUT = Path(sys.argv[1] if len(sys.argv) > 1 else ".typecheck/stubs")


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"{name} is not installed: pip install --no-deps tensorrt-stubs (see Makefile: typecheck)")
    for loc in spec.submodule_search_locations:
        if any(Path(loc).glob("*.pyi")):
            return Path(loc)
    sys.exit(f"{name}: no .pyi stubs found in {list(spec.submodule_search_locations)}")


def main() -> None:
    if OUT.exists():
        shutil.rmtree(OUT)
    for pkg in ("tensorrt", "tensorrt_bindings"):
        src = _package_dir(pkg)
        dst = OUT / pkg
        dst.mkdir(parents=True)
        for stub in src.glob("*.pyi"):
            text = stub.read_text()
            text = re.sub(r"(?<=[(,] )in(?=: )", "in_", text)  # `in` is a keyword
            text = re.sub(r"(, channel_axis: int)\)", r"\1 = ...)", text)  # non-default after defaults
            (dst / stub.name).write_text(text)
    print(OUT)


if __name__ == "__main__":
    main()
