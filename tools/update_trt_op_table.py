"""Regenerate deploycompress_device/data/onnx_tensorrt_operators.json from onnx-tensorrt's docs/operators.md.

The table is the ONNX-TensorRT parser's own support matrix (https://github.com/onnx/onnx-tensorrt,
docs/operators.md). Usage, from a clone of onnx-tensorrt:

    git -C onnx-tensorrt show <commit>:docs/operators.md > operators.md
    python tools/update_trt_op_table.py operators.md --tensorrt 10.1 --commit <commit> --branch 10.1-GA
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "deploycompress_device" / "data" / "onnx_tensorrt_operators.json"


def parse(text: str) -> dict:
    m = re.search(r"inclusive range of opset (\d+) to opset (\d+)", text)
    opset = [int(m.group(1)), int(m.group(2))] if m else None
    ops: dict[str, dict] = {}
    in_table = False
    for line in text.splitlines():
        if line.startswith("| Operator"):
            in_table = True
            continue
        if not in_table or not line.startswith("|") or set(line) <= set("|- "):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        name, supported = cells[0], cells[1] if len(cells) > 1 else ""
        if not name or supported not in ("Y", "N"):
            continue
        types = [t.strip() for t in cells[2].split(",") if t.strip()] if len(cells) > 2 else []
        restrictions = re.sub(r"<br\s*/?>", " ", cells[3]).strip() if len(cells) > 3 else ""
        ops[name] = {"supported": supported == "Y", "types": types, "restrictions": restrictions}
    return {"opset_range": opset, "operators": ops}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("operators_md", type=Path)
    ap.add_argument("--tensorrt", required=True, help="TensorRT version the table documents, e.g. 10.1")
    ap.add_argument("--commit", required=True, help="onnx-tensorrt commit the file was read from")
    ap.add_argument("--branch", default="")
    args = ap.parse_args()
    table = parse(args.operators_md.read_text())
    data = json.loads(OUT.read_text()) if OUT.is_file() else {"version": 1, "tables": {}}
    data["tables"][args.tensorrt] = {
        "source": f"https://github.com/onnx/onnx-tensorrt/blob/{args.commit}/docs/operators.md",
        "commit": args.commit,
        "branch": args.branch,
        **table,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    print(f"{OUT}: TensorRT {args.tensorrt}: {len(table['operators'])} operators, opset {table['opset_range']}")


if __name__ == "__main__":
    main()
