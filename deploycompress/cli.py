"""The ``deploycompress`` command: build, profile, validate and inspect engines.

Exit codes: 0 success, 2 bad input (arguments, files, configs; the message says what to change),
1 failure (a step failed on valid input, or a validation missed its tolerance).

argparse (standard library) rather than click/typer: the command is a thin shell over the public
API, four subcommands with plain options need nothing more, and it adds no dependency.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from .cli_args import (SuggestingParser, check_recipe, cosine, fraction, non_negative_float, non_negative_int, parse_shape, positive_float,
                       positive_int, shape_arg)
from .errors import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, InputError, exit_code
from .suggest import did_you_mean

__all__ = ["main", "UsageError"]

log = logging.getLogger("deploycompress.cli")

class UsageError(InputError, ValueError):
    """Bad input to the command line; exits with 2."""


# -- parsing helpers ------------------------------------------------------------------------------
def _ints(text: str) -> list[int]:
    """Dims in the one strict shape grammar (:func:`deploycompress.cli_args.parse_shape`)."""
    try:
        return parse_shape(text, "dims")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


@dataclass(frozen=True)
class InputShape:
    """One ``--input-shape``: ``[name=]dims[:dtype]``, e.g. ``1,3,224,224``, ``ids=1,128:int64``."""

    name: str | None
    dims: tuple[int, ...]
    dtype: str = "float32"


def _input_shape(text: str) -> InputShape:
    name, _, rest = str(text).rpartition("=")
    dims, _, dtype = rest.partition(":")
    dtype = dtype or "float32"
    if name and not name.isidentifier():
        raise argparse.ArgumentTypeError(f"input name {name!r} in {text!r} is not a forward() parameter name")
    if dtype not in ("float32", "float16", "int64", "int32", "bool"):
        raise argparse.ArgumentTypeError(f"dtype must be float32, float16, int64, int32 or bool, got {dtype!r} in {text!r}")
    return InputShape(name or None, tuple(_ints(dims)), dtype)


def _dynamic_axes(specs: list[str]) -> dict[str, dict[int, str]]:
    """``ids=1:sequence`` -> {"ids": {1: "sequence"}} (the name defaults to ``<input>_dim<axis>``)."""
    axes: dict[str, dict[int, str]] = {}
    for spec in specs:
        name, _, rest = spec.partition("=")
        axis, _, label = rest.partition(":")
        if not name or not axis.isdigit() or int(axis) < 1:
            raise UsageError(f"--dynamic-axis {spec!r}: expected INPUT=AXIS[:NAME] with AXIS >= 1 (axis 0 is the batch)")
        axes.setdefault(name, {})[int(axis)] = label or f"{name}_dim{axis}"
    return axes


def _example_inputs(shapes: list[InputShape]) -> Any:
    """One tensor, a tuple (positional) or a dict (named) of random example inputs."""
    import torch

    def make(s: InputShape):
        if s.dtype in ("int64", "int32"):
            return torch.zeros(s.dims, dtype=getattr(torch, s.dtype))
        if s.dtype == "bool":
            return torch.ones(s.dims, dtype=torch.bool)
        return torch.randn(*s.dims, dtype=getattr(torch, s.dtype))

    named = [s.name is not None for s in shapes]
    if any(named) and not all(named):
        raise UsageError("--input-shape: name every input (name=dims) or none")
    if all(named) and shapes:
        return {s.name: make(s) for s in shapes}
    return make(shapes[0]) if len(shapes) == 1 else tuple(make(s) for s in shapes)


def _import_object(spec: str, what: str) -> Any:
    """``package.module:attr`` -> the attribute; every failure names the part that is wrong."""
    if ":" not in spec:
        raise UsageError(f"{what} {spec!r} must look like package.module:name")
    module_name, _, attr = spec.partition(":")
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"{what} {spec!r}: cannot import module {module_name!r} ({exc})") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"{what} {spec!r}: {getattr(obj, '__name__', module_name)!r} has no attribute {part!r}"
                             f"{did_you_mean(part, [n for n in dir(obj) if not n.startswith('_')])}")
        obj = getattr(obj, part)
    return obj


def _resolve(path: str | None, base: Path | None) -> str | None:
    """A recipe's relative paths are relative to the recipe file."""
    if path is None or base is None or ":" in str(path) and not Path(str(path)).exists():
        return path
    p = Path(path)
    return str(p if p.is_absolute() else base / p)


def _load_model(factory: str | None, torchvision_name: str | None, weights: str | None, kwargs: dict | None = None):
    import torch

    if bool(factory) == bool(torchvision_name):
        raise UsageError("name the model with exactly one of --model package.module:factory or --torchvision NAME")
    if torchvision_name:
        try:
            import torchvision
        except ImportError:
            raise UsageError("--torchvision needs torchvision: pip install 'deploycompress[test]'") from None
        try:
            model = torchvision.models.get_model(torchvision_name, weights=None, **(kwargs or {}))
        except ValueError:
            known = torchvision.models.list_models(module=torchvision.models)
            raise UsageError(f"--torchvision {torchvision_name!r} is not a torchvision classification model"
                             f"{did_you_mean(torchvision_name, known) or f'; e.g. {known[:8]}'}") from None
    else:
        fn = _import_object(factory, "--model")  # type: ignore[arg-type]
        if not callable(fn):
            raise UsageError(f"--model {factory!r} is not callable")
        model = fn(**(kwargs or {}))
        if not isinstance(model, torch.nn.Module):
            raise UsageError(f"--model {factory!r} returned {type(model).__name__}, not a torch.nn.Module")
    if weights:
        if not Path(weights).is_file():
            raise UsageError(f"--weights {weights!r} does not exist")
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise UsageError(f"--weights {weights!r} is not a state dict torch.load(weights_only=True) can read: {exc}") from None
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            detail = " ".join(line.strip() for line in str(exc).splitlines()[1:4])
            raise UsageError(f"--weights {weights!r} do not fit the model ({type(model).__name__}): {detail}") from None
    return model.eval()


def _load_arrays(spec: str, what: str) -> tuple[Any, Any]:
    """Data from ``.npy`` (inputs), ``.npz`` (``x`` and optional ``y`` labels; or one array per input,
    keyed by input name, for a model with several inputs) or ``module:function`` (returning inputs,
    ``(inputs, labels)``, or an iterable of input batches)."""
    import numpy as np

    path = Path(spec)
    if path.suffix in (".npy", ".npz"):
        if not path.is_file():
            raise UsageError(f"{what} {spec!r} does not exist")
        if path.suffix == ".npy":
            return np.load(path, allow_pickle=False), None
        with np.load(path, allow_pickle=False) as data:
            labels = data["y"] if "y" in data else None
            if "x" in data:
                return data["x"], labels
            named = {k: data[k] for k in data.files if k != "y"}
            if not named:
                raise UsageError(f"{what} {spec!r} has arrays {sorted(data.files)}; it needs 'x' (inputs) or one array per "
                                 "input named after it, and optionally 'y' (labels)")
            return named, labels
    if ":" in spec:
        value = _import_object(spec, what)
        value = value() if callable(value) else value
        if isinstance(value, tuple) and len(value) == 2:
            return value
        return value, None
    raise UsageError(f"{what} {spec!r}: expected a .npy/.npz file or package.module:function")


def _tensor(array: Any):
    import numpy as np
    import torch

    if isinstance(array, dict):
        return {k: _tensor(v) for k, v in array.items()}
    if isinstance(array, torch.Tensor):
        return array
    a = np.ascontiguousarray(array)
    return torch.as_tensor(a) if a.dtype.kind in "iub" else torch.as_tensor(a, dtype=torch.float32)


def _check_data_fits(runner: Any, data: Any, option: str) -> None:
    """Refuse ``data`` (a tensor, or a dict keyed by input name) whose rank or fixed dims differ from the
    artifact's inputs, before anything runs: the message names the option, the input and both shapes."""
    specs = list(getattr(runner, "inputs", None) or [])
    arrays = data if isinstance(data, dict) else ({specs[0].name: data} if len(specs) == 1 else {})
    for spec in specs:
        if spec.name not in arrays:
            if isinstance(data, dict):
                raise UsageError(f"{option} lacks the artifact's input {spec.name!r}; its arrays: {sorted(data)}"
                                 f"{did_you_mean(spec.name, data)}")
            continue
        shape = tuple(arrays[spec.name].shape)
        fits = len(shape) == len(spec.shape) and all(not isinstance(d, int) or d == s for d, s in zip(spec.shape[1:], shape[1:]))
        if not fits:
            raise UsageError(
                f"{option}: input {spec.name!r} has shape {list(shape)}, the artifact takes {list(spec.shape)} "
                "(named dims are dynamic); give data of that shape"
            )


def _batches(data: Any, batch_size: int, limit: int | None) -> list:
    """Calibration batches: an array is split along axis 0; an iterable of batches is taken as it is."""
    import numpy as np
    import torch

    if isinstance(data, (np.ndarray, torch.Tensor)):
        x = _tensor(data)
        out = [x[i : i + batch_size] for i in range(0, len(x), batch_size)]
    elif isinstance(data, dict):  # one array per input name: batches are dicts
        arrays = {k: _tensor(v) for k, v in data.items()}
        n = len(next(iter(arrays.values())))
        out = [{k: v[i : i + batch_size] for k, v in arrays.items()} for i in range(0, n, batch_size)]
    else:
        out = [_tensor(b[0] if isinstance(b, (tuple, list)) else b) for b in data]
    if limit:
        out = out[:limit]
    if not out:
        raise UsageError("the calibration data is empty")
    return out


def _load_recipe(path: str) -> dict:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--recipe {path!r} does not exist")
    try:
        recipe = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UsageError(f"--recipe {path!r} is not valid YAML: {exc}") from None
    return check_recipe(recipe, f"recipe {path!r}")  # every section's keys and values, typos named


# -- output ---------------------------------------------------------------------------------------
def _emit(args: argparse.Namespace, data: dict, text: str) -> None:
    if args.json:
        args.document = data  # printed by main() once stdout is stdout again: one JSON document
    else:
        print(text)


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Send everything written to stdout (Python prints and, at the descriptor, C libraries such as
    the ONNX exporter's graph dump) to stderr for the duration: ``--json`` keeps stdout for its document."""
    sys.stdout.flush()
    sys.stderr.flush()
    try:  # descriptor 1 is the process's stdout whatever sys.stdout is
        saved = os.dup(1)
        os.dup2(2, 1)
    except OSError:  # no usable descriptors (an embedded interpreter): Python-level only
        saved = None
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        if saved is not None:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)


# -- build ----------------------------------------------------------------------------------------
def cmd_build(args: argparse.Namespace) -> int:
    with contextlib.ExitStack() as cleanup:  # temporary files (the pruning report) go once the bundle is written
        return _cmd_build(args, cleanup)


def _cmd_build(args: argparse.Namespace, cleanup: contextlib.ExitStack) -> int:
    import shutil
    import tempfile

    import torch

    from . import pruning
    from .bundle import check_out_dir
    from .engine import build_engine

    recipe = _load_recipe(args.recipe) if args.recipe else {}
    base = Path(args.recipe).resolve().parent if args.recipe else None
    if base is not None and str(base) not in sys.path:
        sys.path.insert(0, str(base))  # the recipe's `module:function` names live beside it
    m, prune, quant, build, ev = (recipe.get(k) or {} for k in ("model", "prune", "quantize", "build", "eval"))

    # -- every input is checked before the model is built, pruned or fine-tuned ---------------------
    check_out_dir(args.out, overwrite=args.force)
    shapes = args.input_shape or _recipe_shapes(recipe.get("input_shape"))  # one strict grammar for both
    if not shapes:
        raise UsageError("give the example input shape with --input-shape N,C,H,W, once per input (or input_shape in the recipe)")
    masks: Any = args.masks
    if masks and not Path(masks).is_file():
        raise UsageError(f"--masks {masks!r} does not exist")
    if masks and prune:
        log.info("--masks given: the recipe's prune section is not run")
    if args.calib or args.calib_data:  # the command line names the calibration source as a whole
        calib, data_spec = args.calib, args.calib_data
    else:
        calib, data_spec = _resolve(quant.get("calibration"), base), _resolve(quant.get("data"), base)
        if calib and data_spec:
            raise UsageError("recipe quantize: give either 'calibration' (a CalibConfig JSON) or 'data' (batches to calibrate on), not both")
    if calib and not Path(calib).is_file():
        raise UsageError(f"--calib {calib!r} does not exist")
    pruner_name = None
    if prune and not masks:
        pruner_name = prune.get("pruner", "L1NormPruner")
        known = [n for n in pruning.__all__ if n.endswith("Pruner") and isinstance(getattr(pruning, n), type)]
        if pruner_name not in known:
            raise UsageError(f"recipe prune.pruner {pruner_name!r} is not a pruner{did_you_mean(pruner_name, known)}; known: {known}")
        if "config_list" not in prune:
            raise UsageError("recipe section 'prune' needs a config_list")
        if prune.get("finetune"):
            _import_object(prune["finetune"], "recipe prune.finetune")  # found now, not after pruning
    precision = args.precision or build.get("precision", "int8")
    if precision == "int8" and not calib and not data_spec:  # found now, not after pruning and fine-tuning
        raise UsageError("precision int8 needs a calibration: give --calib CALIB.json or --calib-data DATA (recipe: "
                         "quantize.calibration or quantize.data), or build another precision (--precision fp32)")
    backend = args.backend or build.get("backend", "onnxruntime")
    if args.bias_correction or quant.get("bias_correction", False):  # found now, not after pruning and fine-tuning
        if precision != "int8" or not data_spec:
            raise UsageError("--bias-correction (recipe: quantize.bias_correction) corrects the int8 biases on the "
                             "calibration data: build --precision int8 with --calib-data DATA (recipe: quantize.data), "
                             "or drop it (a --calib/quantize.calibration JSON carries no data to correct on)")
        if backend != "onnxruntime":
            raise UsageError(f"--bias-correction (recipe: quantize.bias_correction) is measured for the onnxruntime "
                             f"target's placement only: drop it for --backend {backend}")
    calib_data = None
    if data_spec:
        x, _ = _load_arrays(data_spec, "--calib-data" if args.calib_data else "recipe quantize.data")
        calib_data = _batches(x, int(quant.get("batch_size", 32)), quant.get("batches"))
    eval_inputs = eval_labels = None
    eval_spec = args.eval_data or _resolve(ev.get("data"), base)
    if eval_spec:
        x, y = _load_arrays(eval_spec, "--eval-data" if args.eval_data else "recipe eval.data")
        eval_inputs = _tensor(x)
        eval_labels = None if y is None else torch.as_tensor(y)

    factory = args.model or m.get("factory")
    tv_name = args.torchvision or m.get("torchvision")
    if args.model or args.torchvision:  # the command line overrides the recipe's model as a whole
        factory, tv_name = args.model, args.torchvision
    model = _load_model(factory, tv_name, args.weights or _resolve(m.get("weights"), base), m.get("kwargs"))
    example = _example_inputs(shapes)
    attachments: dict[str, Path] = {}  # the pruning search's report, carried into the bundle
    if pruner_name is not None:  # any pruner by class name, scheduled and automatic ones included
        log.info("build: pruning with %s", pruner_name)
        try:
            pruner = pruning.make_recipe_pruner(model, prune, example, _import_object)
        except (ValueError, TypeError) as exc:
            raise UsageError(str(exc)) from None
        model, masks = pruning.run_prune_section(pruner, prune, _import_object)
        report_dir = Path(tempfile.mkdtemp(prefix="dc-prune-report-"))
        cleanup.callback(shutil.rmtree, report_dir, True)
        attachments = {f"pruning/{p.name}": p for p in pruning.write_search_report(pruner, report_dir)}
    artifact = build_engine(
        model,
        masks,
        calib,
        example_inputs=example,
        backend=backend,
        precision=precision,
        out_dir=args.out,
        calib_data=calib_data,
        quant_config_list=quant.get("config_list"),
        calibrator=args.calibrator or quant.get("calibrator", "minmax"),
        bias_correction=bool(args.bias_correction or quant.get("bias_correction", False)),
        eval_inputs=eval_inputs,
        eval_labels=eval_labels,
        batch_sizes=args.batch_sizes or build.get("batch_sizes", [1]),
        iterations=args.iterations if args.iterations is not None else build.get("iterations", 100),
        name=args.name or m.get("name"),
        round_to=int(prune.get("round_to", 1)),
        norm_spans=args.norm_spans or prune.get("norm_spans", "keep"),
        overwrite=args.force,
        dynamic_axes=_dynamic_axes(args.dynamic_axis or []),
        progress=not args.quiet,
        strict=args.strict,
        attachments=attachments,
    )
    from .report import report_summary

    text = report_summary(artifact.report) + f"\n\nbundle: {artifact.out_dir}\nreport: {artifact.report_html}"
    _emit(args, {"out_dir": str(artifact.out_dir), "report_html": str(artifact.report_html), "manifest": artifact.manifest.to_dict(),
                 "report": artifact.report.to_dict()}, text)
    return EXIT_OK


# -- artifacts: a bundle directory or an .onnx file -----------------------------------------------
def _read_onnx(path: Path, *, external_data: bool = True, data: bytes | None = None):
    """An ONNX model (from ``path``, or from ``data`` read from it) that parses and holds a graph;
    an empty or foreign file is a UsageError naming it."""
    import onnx

    if (len(data) if data is not None else path.stat().st_size) == 0:
        raise UsageError(f"{str(path)!r} is an empty file, not an ONNX model")
    try:
        model = onnx.load_model_from_string(data) if data is not None else onnx.load(str(path), load_external_data=external_data)
    except Exception as exc:
        raise UsageError(f"{str(path)!r} is not an ONNX model: {exc}") from None
    if not model.graph.node or not model.graph.output:
        raise UsageError(f"{str(path)!r} holds no ONNX graph (no nodes or no outputs)")
    return model


def _open_artifact(path: str):
    """(runner, manifest or None, precision) for a bundle directory or a bare ONNX file."""
    from .backends import get_backend
    from .bundle import open_bundle

    p = Path(path)
    if p.is_dir():
        manifest, runner = open_bundle(p)
        return runner, manifest, manifest.precision
    if p.is_file() and p.suffix == ".onnx":
        graph = _read_onnx(p, external_data=False).graph
        precision = "int8" if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in graph.node) else "fp32"
        return get_backend("onnxruntime").load(p), None, precision
    raise UsageError(f"{path!r} is neither a bundle directory nor an .onnx file")


def _recipe_shapes(value: Any) -> list[InputShape]:
    """A recipe's input_shape: [1, 3, 224, 224], "1,3,224,224", or a list of such (one per input, "name=dims" allowed)."""
    if not value:
        return []
    try:
        if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
            return [_input_shape(",".join(map(str, value)))]
        items = value if isinstance(value, list) else [value]
        return [_input_shape(",".join(map(str, v)) if isinstance(v, list) else str(v)) for v in items]
    except argparse.ArgumentTypeError as exc:
        raise UsageError(f"recipe input_shape: {exc}") from None


def _feeds(runner, batch: int, input_shapes: list[InputShape] | None):
    import numpy as np

    feeds = {}
    rng = np.random.default_rng(0)
    shapes = list(input_shapes or [])
    by_name = {s.name: s for s in shapes if s.name}
    for k, spec in enumerate(runner.inputs):
        given = by_name.get(spec.name) or (shapes[k] if not by_name and k < len(shapes) else None)
        input_shape = list(given.dims) if given else None
        dims = []
        for i, d in enumerate(spec.shape):
            if isinstance(d, int) and d > 0:
                dims.append(d)
            elif i == 0:
                dims.append(batch)
            elif input_shape and len(input_shape) == len(spec.shape):
                dims.append(input_shape[i])
            else:
                raise UsageError(f"input {spec.name!r} has dynamic axis {i} ({d!r}); give --input-shape with {len(spec.shape)} dims")
        if input_shape and len(input_shape) == len(spec.shape):
            dims = [batch] + list(input_shape[1:])
        if np.dtype(spec.dtype).kind in "iub":
            feeds[spec.name] = np.zeros(dims, dtype=spec.dtype)
        else:
            feeds[spec.name] = rng.standard_normal(dims).astype(spec.dtype)
    return feeds


def cmd_profile(args: argparse.Namespace) -> int:
    from .report import LatencyRecord, Report, performance_summary, report_summary
    from .validate import measure_latency

    runner, manifest, precision = _open_artifact(args.artifact)
    feeds = _feeds(runner, 1, args.input_shape)
    stats = measure_latency(runner, feeds, batch_sizes=args.batch_sizes, warmup=args.warmup, iterations=args.iterations, duration_s=args.duration)
    records = [LatencyRecord.from_stats(s, runner.backend, precision) for s in stats]
    report = Report(name=manifest.name if manifest else Path(args.artifact).stem, backend=runner.backend, precision=precision, latency=records)
    if args.layers:
        report.set_layers(runner.profile(_feeds(runner, args.batch_sizes[0], args.input_shape), iterations=max(5, args.iterations // 5)))
    _emit(args, {"latency": [_without_samples(r.__dict__) for r in records], "layers": [l.__dict__ for l in report.layers[: args.layers]]},
          report_summary(report, top_layers=args.layers) if args.layers else performance_summary(records))
    return EXIT_OK


def _without_samples(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "samples_ms"}


def cmd_validate(args: argparse.Namespace) -> int:
    import numpy as np

    from .validate import validate

    runner, manifest, precision = _open_artifact(args.artifact)
    x, y = _load_arrays(args.data, "--data")
    x = _tensor(x)
    _check_data_fits(runner, x, "--data")
    labels = None if y is None else np.asarray(y)
    if args.reference_model or args.torchvision:
        reference: Any = _load_model(args.reference_model, args.torchvision, args.weights)
        ref_label = "pytorch"
    elif manifest is not None and "source/model.fp32.onnx" in manifest.files:
        from .bundle import load_bundle
        from .validate import run_batched

        fp32 = load_bundle(args.artifact, member="source/model.fp32.onnx", backend="onnxruntime")  # verified bytes
        reference = lambda feeds: run_batched(fp32, feeds)  # noqa: E731
        ref_label = "bundle fp32 onnx"
    else:
        raise UsageError("name the reference with --reference package.module:factory (and --weights) or --torchvision NAME")
    result = validate(runner, reference, x, labels=labels, metric_name="top1", batch_sizes=args.batch_sizes, iterations=args.iterations)
    acc, metric = result.accuracy, result.metric
    data = result.to_dict()
    for entry in data["latency"]:
        entry.pop("samples_ms", None)
    failures = []
    per_output = dict(result.outputs) or {result.primary_output: acc}  # the value tolerances hold for every output
    for out_name, stats in per_output.items():
        where = f" ({out_name})" if len(per_output) > 1 else ""
        if args.max_abs_error is not None and stats.max_abs_error > args.max_abs_error:
            failures.append(f"max |diff|{where} {stats.max_abs_error:.4g} > --max-abs-error {args.max_abs_error}")
        if args.min_cosine is not None and stats.cosine_similarity < args.min_cosine:
            failures.append(f"cosine similarity{where} {stats.cosine_similarity:.6f} < --min-cosine {args.min_cosine}")
    if args.min_top1_agreement is not None and (acc.top1_agreement or 0.0) < args.min_top1_agreement:
        failures.append(f"top-1 agreement {acc.top1_agreement} < --min-top1-agreement {args.min_top1_agreement}")
    if args.max_accuracy_drop is not None:
        if metric is None:
            raise UsageError("--max-accuracy-drop needs labelled --data (an .npz with 'y')")
        if -metric.delta > args.max_accuracy_drop:
            failures.append(f"accuracy drop {-metric.delta:.4f} > --max-accuracy-drop {args.max_accuracy_drop}")
    data.update(reference=ref_label, passed=not failures, failures=failures)
    lines = [f"reference: {ref_label}", f"max |diff| = {acc.max_abs_error:.4g}", f"cosine similarity = {acc.cosine_similarity:.6f}"]
    if len(per_output) > 1:
        lines[1:] = [f"[{n}] max |diff| = {s.max_abs_error:.4g}, cosine similarity = {s.cosine_similarity:.6f}"
                     + (" (primary)" if n == result.primary_output else "") for n, s in per_output.items()]
    if acc.top1_agreement is not None:
        lines.append(f"top-1 agreement{f' [{result.primary_output}]' if len(per_output) > 1 else ''} = {100 * acc.top1_agreement:.2f}%")
    if metric is not None:
        lines.append(f"{metric.name} = {100 * metric.value:.2f}% (reference {100 * metric.reference_value:.2f}%, {100 * metric.delta:+.2f} pt)")
    from .report import LatencyRecord, performance_summary

    lines.append(performance_summary([LatencyRecord.from_stats(s, runner.backend, precision) for s in result.latency]))
    lines.append("PASSED" if not failures else "FAILED: " + "; ".join(failures))
    _emit(args, data, "\n".join(lines))
    return EXIT_OK if not failures else EXIT_FAILURE


def cmd_inspect(args: argparse.Namespace) -> int:
    from collections import Counter

    from .export import lint_qdq
    from .export.onnx_export import tensor_specs

    p = Path(args.artifact)
    manifest = None
    foreign: tuple[Path, Any] | None = None  # the model's own float graph, when the bundle was built for another backend
    if p.is_dir():
        from .bundle import read_verified

        qdq_rel = "source/model.qdq.onnx"
        manifest, verified = read_verified(  # the graphs inspected are the bytes verified
            p, optional=[qdq_rel, "source/model.fp32.onnx", *(f"tensorrt/model.{q}.onnx" for q in ("int8", "fp16", "fp32"))])
        graph_rel = manifest.artifact
        if graph_rel.endswith(".plan"):  # a TensorRT engine: inspect the graph it was built from
            graph_rel = next((g for g in (f"tensorrt/model.{manifest.precision}.onnx", qdq_rel, "source/model.fp32.onnx")
                              if g in verified), graph_rel)
        graph_path = p / graph_rel
        graph = _read_onnx(graph_path, data=verified[graph_rel])
        fp32_rel = "source/model.fp32.onnx"
        if manifest.backend != args.target and fp32_rel in verified:  # e.g. an onnxruntime bundle checked for TensorRT
            foreign = (p / fp32_rel, _read_onnx(p / fp32_rel, data=verified[fp32_rel]))
        lint_path, lint_graph = (p / qdq_rel, _read_onnx(p / qdq_rel, data=verified[qdq_rel])) if qdq_rel in verified else (graph_path, graph)
    elif p.is_file() and p.suffix == ".onnx":
        graph_path = lint_path = p
        graph = lint_graph = _read_onnx(graph_path)
    else:
        raise UsageError(f"{args.artifact!r} is neither a bundle directory nor an .onnx file")
    ops = Counter(n.op_type for n in graph.graph.node)
    qdq = ops.get("QuantizeLinear", 0) + ops.get("DequantizeLinear", 0)
    linted = bool(qdq) or lint_path != graph_path
    findings = lint_qdq(lint_graph, target=args.target) if linted else []
    inputs, outputs = tensor_specs(graph.graph.input), tensor_specs(graph.graph.output)
    data: dict[str, Any] = {
        "path": str(graph_path),
        "inputs": [t.to_dict() for t in inputs],
        "outputs": [t.to_dict() for t in outputs],
        "ops": dict(ops.most_common()),
        "qdq_nodes": qdq,
        "lint": {"target": args.target, "graph": str(lint_path), "findings": [_finding(f) for f in findings]} if linted else None,
        "manifest": manifest.to_dict() if manifest else None,
    }
    lines = [f"graph: {graph_path}"]
    if manifest:
        lines.append(f"bundle: {manifest.name} ({manifest.backend}, {manifest.precision}), {len(manifest.files)} files, checksums OK")
    lines += [f"input  {t.name}: {t.dtype} {list(t.shape)}" for t in inputs]
    lines += [f"output {t.name}: {t.dtype} {list(t.shape)}" for t in outputs]
    lines.append(f"nodes: {sum(ops.values())}, Q/DQ nodes: {qdq}")
    lines += [f"  {op:<24}{count}" for op, count in ops.most_common()]
    if manifest and manifest.backend != args.target:
        data["note"] = (f"the bundle was built for {manifest.backend}: its Q/DQ graph is in {manifest.backend}'s flavour, so lint findings "
                        f"for {args.target} describe it as it is" + (f"; the {args.target} checks read the model's float graph "
                        f"({foreign[0].name})" if foreign and args.target == "tensorrt" else "")
                        + f"; build with --backend {args.target} for a {args.target} graph")
        lines.append(f"note: {data['note']}")
    if linted:
        lines.append(f"lint ({args.target}, {lint_path.name}): {len(findings)} finding(s)")
    else:
        lines.append("lint: no Q/DQ nodes (a float graph), nothing to lint")
    lines += [f"  {getattr(f, 'severity', 'error')} [{getattr(f, 'rule', '?')}] {getattr(f, 'node', '?')}: {getattr(f, 'message', f)}" for f in findings[:50]]
    if args.target == "tensorrt":
        from .export.tensorrt_checks import check_tensorrt

        static = None
        if args.dla_core is not None:  # DLA builds one shape: a dynamic batch is checked at 1
            static = {t.name: [1 if (j == 0 and not isinstance(d, int)) else d for j, d in enumerate(t.shape)] for t in inputs}
        trt = check_tensorrt(foreign[1] if foreign else graph, tensorrt_version=args.tensorrt_version, dla_core=args.dla_core, lint=False, static_shapes=static,
                             precision=manifest.precision if manifest else ("int8" if qdq else "fp16"))
        data["tensorrt"] = trt.to_dict()
        shown = [f for f in trt.findings if f.severity != "info" or args.verbose]
        lines.append(f"TensorRT {trt.tensorrt_version} checks (operator table {trt.op_table}"
                     + (f", DLA core {args.dla_core}" if args.dla_core is not None else "") + f"): {len(trt.errors)} error(s), "
                     + f"{sum(f.severity == 'warning' for f in trt.findings)} warning(s)")
        lines += [f"  {f.severity} [{f.rule}] {f.node}: {f.message}" for f in shown[:50]]
        if args.dla_core is not None:
            lines.append(f"layers that would run on the GPU instead of DLA (batch checked at 1): {len(trt.gpu_layers)}")
            lines += [f"  {g}" for g in trt.gpu_layers[:50]]
    _emit(args, data, "\n".join(lines))
    return EXIT_OK


def cmd_device_build(args: argparse.Namespace) -> int:
    from deploycompress_device.device_build import run_from_args

    return run_from_args(args)


def _finding(f: Any) -> Any:
    return f.to_dict() if hasattr(f, "to_dict") else str(f)


# -- entry point ----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one JSON document on stdout (progress and logs go to stderr)")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    common.add_argument("-v", "--verbose", action="store_true", help="log each step")

    parser = SuggestingParser(prog="deploycompress", description="Build, profile, validate and inspect compressed engines.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{build,profile,validate,inspect,device-build}")

    b = sub.add_parser("build", parents=[common], help="masks -> speedup -> ONNX -> QDQ -> engine -> bundle with report")
    source = b.add_mutually_exclusive_group()
    source.add_argument("--model", help="package.module:factory returning an nn.Module")
    source.add_argument("--torchvision", metavar="NAME", help="a torchvision classification model (random weights unless --weights)")
    b.add_argument("--weights", help="state dict (.pt) for the model")
    b.add_argument("--masks", help="masks file saved by a pruner (NNI layout)")
    b.add_argument("--norm-spans", choices=["keep", "prune"], help="speedup: keep (default) or remove widths a LayerNorm spans")
    calibration = b.add_mutually_exclusive_group()
    calibration.add_argument("--calib", help="CalibConfig JSON (or NNI calibration dict)")
    calibration.add_argument("--calib-data", help="calibrate here: .npy/.npz (x) or package.module:function yielding batches")
    b.add_argument("--calibrator", choices=["minmax", "percentile", "entropy", "mse"])
    b.add_argument("--bias-correction", action="store_true",
                   help="with --calib-data: correct the int8 biases on the calibration data (Nagel et al. 2019)")
    b.add_argument("--eval-data", help="validate on this: .npz with x (and y labels) or package.module:function")
    b.add_argument("--input-shape", type=_input_shape, action="append",
                   help="example input shape, once per input in forward's order: 1,3,224,224; or named: rgb=1,3,64,64 "
                        "depth=1,1,64,64; a dtype after a colon: ids=1,128:int64")
    b.add_argument("--backend", choices=["onnxruntime", "tensorrt"])
    b.add_argument("--precision", choices=["int8", "fp16", "fp32"], help="fp16: TensorRT only")
    b.add_argument("--batch-sizes", type=shape_arg, help="batch sizes to measure, e.g. 1,8")
    b.add_argument("--iterations", type=positive_int, help="timed runs per batch size (>= 1)")
    b.add_argument("--name", help="model name in the Triton repository")
    b.add_argument("--dynamic-axis", action="append", metavar="INPUT=AXIS[:NAME]",
                   help="a dynamic axis beyond the batch, e.g. ids=1:sequence (repeat per axis)")
    b.add_argument("--recipe", help="YAML recipe: model, input_shape, prune (pruner + config_list), quantize, build, eval")
    b.add_argument("--out", required=True, help="bundle directory (written atomically)")
    b.add_argument("--force", action="store_true", help="replace a non-empty --out")
    b.add_argument("--strict", action="store_true",
                   help="fail when fewer weighted layers run in int8 than the calibration selects (default: a warning naming them)")
    b.set_defaults(func=cmd_build)

    p = sub.add_parser("profile", parents=[common], help="latency percentiles and per-layer time of a bundle or .onnx")
    p.add_argument("artifact", help="bundle directory or model.onnx")
    p.add_argument("--batch-sizes", type=shape_arg, default=[1])
    p.add_argument("--warmup", type=non_negative_int, default=10)
    p.add_argument("--iterations", type=positive_int, default=100)
    p.add_argument("--duration", type=positive_float, help="measure for this many seconds instead of a fixed count")
    p.add_argument("--layers", type=non_negative_int, default=10, help="show the N slowest layers (0: skip the per-layer profile)")
    p.add_argument("--input-shape", type=_input_shape, action="append",
                   help="full input shape where the model has dynamic axes besides the batch, once per input ([name=]dims)")
    p.set_defaults(func=cmd_profile)

    v = sub.add_parser("validate", parents=[common], help="accuracy and fidelity of a bundle or .onnx against a reference")
    v.add_argument("artifact")
    v.add_argument("--data", required=True, help=".npz with x (and y) or .npy, or package.module:function")
    reference = v.add_mutually_exclusive_group()
    reference.add_argument("--reference", dest="reference_model", help="package.module:factory of the PyTorch reference (default: the bundle's fp32 ONNX)")
    reference.add_argument("--torchvision", metavar="NAME", help="torchvision reference model")
    v.add_argument("--weights", help="state dict for the reference")
    v.add_argument("--batch-sizes", type=shape_arg, default=[1])
    v.add_argument("--iterations", type=positive_int, default=20)
    v.add_argument("--max-abs-error", type=non_negative_float)
    v.add_argument("--min-cosine", type=cosine, help="in [-1, 1]")
    v.add_argument("--min-top1-agreement", type=fraction, help="fraction in [0, 1], e.g. 0.99")
    v.add_argument("--max-accuracy-drop", type=fraction, help="fraction in [0, 1], e.g. 0.01 for one point")
    v.set_defaults(func=cmd_validate)

    i = sub.add_parser("inspect", parents=[common], help="inputs, outputs, op histogram, Q/DQ count and lint findings")
    i.add_argument("artifact", help="bundle directory or model.onnx")
    i.add_argument("--target", choices=["onnxruntime", "tensorrt"], default="tensorrt", help="rules to lint against")
    i.add_argument("--tensorrt-version", help="TensorRT version to check operators and DLA against (default: the newest table)")
    i.add_argument("--dla-core", type=int, help="also check DLA's layer rules and list the layers that would run on the GPU")
    i.set_defaults(func=cmd_inspect)

    from deploycompress_device.device_build import build_parser as device_parser

    d = sub.add_parser("device-build", help="on the device: build model.plan from a portable TensorRT bundle, check it, profile it")
    device_parser(d)
    d.set_defaults(func=cmd_device_build)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # exits 2 on unknown options, like every argparse tool
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    func: Callable[[argparse.Namespace], int] = args.func
    args.json = getattr(args, "json", False)  # device-build has its own parser (no --json): it prints its JSON itself
    args.document = None
    try:
        with _stdout_to_stderr() if args.json else contextlib.nullcontext():
            code = func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code, args.document = EXIT_FAILURE, {"error": "interrupted", "exit_code": EXIT_FAILURE}
    except Exception as exc:  # the one place errors become exit codes
        code = exit_code(exc)  # by the error hierarchy: InputError -> 2, anything else -> 1
        print(f"deploycompress {args.command}: error: {exc}", file=sys.stderr)
        if code != EXIT_USAGE and getattr(args, "verbose", False):
            import traceback

            traceback.print_exc()
        args.document = {"error": str(exc), "error_type": type(exc).__name__, "exit_code": code}
    if args.json:
        print(json.dumps(args.document, indent=1, default=str))
    return code


if __name__ == "__main__":
    sys.exit(main())
