"""NNI's calibration dicts -> CalibConfig, keeping every tensor's numbers as NNI had them.

Both generations' layouts, read from NNI's source (github.com/microsoft/nni):

**NNI 3.0** (``nni/compression/base/compressor.py``, ``Compressor.get_calibration_config``; returned by
every quantizer's ``compress()``)::

    {module: {target: {"scale": Tensor, "zero_point": Tensor, "quant_dtype": "int8" | "uint8" | ...,
                       "quant_scheme": "affine" | "symmetric" | None, "quant_bits": int,
                       "tracked_min": Tensor, "tracked_max": Tensor}}}

with targets ``weight``, ``_input_0`` (or ``_input_``), ``_output_0`` (or ``_output_``). The integer
grid is NNI's (``nni/compression/base/target_space.py``, ``_compute_qmin_qmax``): ``intB`` is
``[-(2**(B-1)) + 1, 2**(B-1) - 1]`` (narrow), ``uintB`` is ``[0, 2**B - 1]``.

**NNI 2.x** (``export_model`` of each quantizer in ``nni/algorithms/compression/pytorch/quantization/``)::

    QAT       weight_bits, weight_scale, weight_zero_point; input_bits, tracked_min_input,
              tracked_max_input; output_bits, tracked_min_output, tracked_max_output
    Observer  <kind>_bits, tracked_min_<kind>, tracked_max_<kind>, tracked_qmin_<kind>, tracked_qmax_<kind>
    LSQ       weight_bits with the input's range (tracked_min_input = -input_scale * qmax); <kind>_bits
              and symmetric tracked ranges for input/output; the learned weight scale is not written
    DoReFa    weight_bits
    BNN       weight_bits

2.x activations are stored as ranges, so their scale and zero point are rebuilt with the formula of
the quantizer that wrote them (QAT: ``update_quantization_param`` with the layer's ``quant_dtype`` and
``quant_scheme``, defaults ``uint`` / ``per_tensor_affine`` from ``nni/compression/pytorch/quantization/settings.py``;
Observer: its ``tracked_qmin/qmax``; LSQ: symmetric signed). Weights and 3.0 targets keep NNI's scale
and zero point as stored. Each imported tensor's ``min``/``max`` is the range NNI's grid represents
(``(qmin - zero_point) * scale .. (qmax - zero_point) * scale``), so a backend that re-expresses it in
NNI's own flavour gets NNI's scale and zero point back. NNI's description of each tensor and the
quantizer are kept in ``CalibConfig.provenance``.
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from calibrators import QuantError, QuantParams, params_from_scale, qrange

__all__ = ["NNIImportWarning", "NNI_QUANTIZERS", "nni_layout", "import_nni_calibration"]

log = logging.getLogger(__name__)

#: quantizer names accepted by ``quantizer=`` (NNI's class names, lower case, without "Quantizer")
NNI_QUANTIZERS = ("ptq", "qat", "observer", "lsq", "dorefa", "bnn")
KINDS = ("weight", "input", "output")


class NNIImportWarning(UserWarning):
    """An NNI calibration imported with an assumption or a gap the caller should know about."""


def _error(msg: str) -> Exception:
    from .calib_config import CalibConfigError

    return CalibConfigError(msg)


@dataclass(frozen=True)
class _Grid:
    """One tensor as NNI describes it."""

    dtype: str  # "int" or "uint"
    bits: int
    scheme: str  # "symmetric" or "affine"
    qmin: int
    qmax: int

    def describe(self) -> dict[str, Any]:
        return {"quant_dtype": f"{self.dtype}{self.bits}", "quant_scheme": self.scheme, "quant_bits": self.bits,
                "qmin": self.qmin, "qmax": self.qmax}


def _nni_qrange(bits: int, dtype: str, *, narrow: bool = True) -> tuple[int, int]:
    """NNI's integer range: signed is narrow (``-127..127``) in QAT/PTQ of both generations; LSQ 2.x uses the full one."""
    if dtype == "int":
        return (-(1 << (bits - 1)) + (1 if narrow else 0), (1 << (bits - 1)) - 1)
    return 0, (1 << bits) - 1


def _array(where: str, key: str, value: Any) -> np.ndarray:
    if value is None:
        raise _error(f"{where}: '{key}' is None (NNI had not computed it: run the quantizer's compress() to the end)")
    if hasattr(value, "detach"):  # a torch tensor from an NNI file
        value = value.detach().cpu().double().numpy()
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise _error(f"{where}: '{key}' must be a number or a tensor, got {type(value).__name__}") from None
    if arr.size == 0 or not np.all(np.isfinite(arr)):
        raise _error(f"{where}: '{key}' is empty or not finite: {arr.reshape(-1)[:4].tolist()}")
    return arr


def _grid_params(where: str, scale: np.ndarray, zp: np.ndarray, grid: _Grid, axis: int | None) -> QuantParams:
    """QuantParams holding NNI's scale and zero point verbatim; min/max = the range NNI's grid represents."""
    s = np.asarray(scale, dtype=np.float64).reshape(-1)
    z = np.broadcast_to(np.asarray(zp, dtype=np.float64).reshape(-1), s.shape)
    if np.any(s < 0):
        raise _error(f"{where}: scale must be positive, got {s[:4].tolist()}")
    if np.any(s == 0):
        # NNI 2.x QAT writes scale 0 for an all-zero (pruned) weight channel; any scale holds zeros
        # exactly: NNI 3.0's own floor (float32 eps, ptq_quantizer.py compute_scale_zp) is used
        if axis is None and s.size == 1 or not where.endswith(".weight"):
            raise _error(f"{where}: scale is 0 (NNI observed an empty range): recalibrate this tensor")
        log.info("%s: %d channel(s) with scale 0 (all-zero weights) get NNI 3.0's floor", where, int((s == 0).sum()))
        s = np.where(s == 0, float(np.finfo(np.float32).eps), s)
    if np.any(z != np.round(z)):
        raise _error(f"{where}: zero_point must be integers, got {z[:4].tolist()}")
    if not 2 <= grid.bits <= 16:
        raise _error(f"{where}: {grid.bits}-bit tensors cannot be deployed (2 to 16 bits)")
    lo_q, hi_q = qrange(grid.bits, grid.dtype == "int")
    if np.any(z < lo_q) or np.any(z > hi_q):
        raise _error(f"{where}: zero_point {z[:4].tolist()} lies outside {grid.dtype}{grid.bits} [{lo_q}, {hi_q}]")
    return QuantParams(
        scale=s.astype(np.float32),
        zero_point=z.astype(np.int64),
        bits=grid.bits,
        dtype=grid.dtype,
        axis=axis,
        min=((grid.qmin - z) * s).astype(np.float32),
        max=((grid.qmax - z) * s).astype(np.float32),
        symmetric=grid.scheme == "symmetric",
    )


def _from_range(where: str, lo: np.ndarray, hi: np.ndarray, grid: _Grid) -> tuple[np.ndarray, np.ndarray]:
    """NNI 2.x ``update_quantization_param`` (qat_quantizer.py): the range widened to hold 0, then
    symmetric ``scale = max|r| / ((qmax - qmin) / 2)`` with zero point 0 (int; LSQ: ``max|r| / qmax``)
    or ``(qmin + qmax) // 2`` (uint), or affine ``scale = (rmax - rmin) / (qmax - qmin)``, ``zp = qmin - round(rmin / scale)``; clamped."""
    if np.any(lo > hi):
        raise _error(f"{where}: tracked min {lo.tolist()} exceeds tracked max {hi.tolist()}")
    lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    if grid.scheme == "symmetric":
        # int: max|r| / qmax (QAT's narrow grid has qmax = (qmax - qmin) / 2; LSQ's abs_max = scale * qmax)
        half = grid.qmax if grid.dtype == "int" else (grid.qmax - grid.qmin) / 2
        scale = np.maximum(np.abs(lo), np.abs(hi)) / half
        zp = np.zeros_like(scale) if grid.dtype == "int" else np.full_like(scale, (grid.qmin + grid.qmax) // 2)
    else:
        scale = (hi - lo) / float(grid.qmax - grid.qmin)
        zp = grid.qmin - np.round(lo / np.where(scale > 0, scale, 1.0))
    if np.any(scale <= 0):
        raise _error(f"{where}: tracked range [{lo.tolist()}, {hi.tolist()}] is empty: NNI's scale would be 0")
    return scale, np.clip(zp, grid.qmin, grid.qmax)


def _axis(where: str, scale: np.ndarray, kind: str) -> int | None:
    """Per-tensor when one value; else the one dimension longer than 1 (NNI keeps dims: ``[C, 1, 1, 1]``)."""
    if scale.size == 1:
        return None
    if kind != "weight":
        raise _error(f"{where}: per-channel activation parameters ({scale.shape}) cannot be deployed; "
                     "quantize activations per tensor (granularity 'default')")
    if scale.ndim <= 1:
        return 0
    long = [d for d, n in enumerate(scale.shape) if n > 1]
    if len(long) != 1:
        raise _error(f"{where}: scale of shape {tuple(scale.shape)} is not per-tensor or per-channel")
    return long[0]


# -- layout detection -------------------------------------------------------------------------------
_V2_KEY = re.compile(r"(?:(weight|input|output)_(?:bits|scale|zero_point)|tracked_(?:q?min|q?max)_(weight|input|output))")


def nni_layout(data: Any) -> str | None:
    """``"nni-3.0"``, ``"nni-2.x"`` or None (not an NNI calibration dict)."""
    if not isinstance(data, Mapping) or not data:
        return None
    entries = list(data.values())
    if not all(isinstance(e, Mapping) for e in entries):
        return None
    if all(e and all(isinstance(t, Mapping) and "scale" in t for t in e.values()) for e in entries):
        return "nni-3.0"
    if any(any(str(k).endswith("_bits") for k in e) for e in entries):
        return "nni-2.x"
    return None


# -- NNI 3.0 ----------------------------------------------------------------------------------------
_TARGET_KIND = {"weight": "weight", "_input_": "input", "_input_0": "input", "_output_": "output", "_output_0": "output"}


def _parse_dtype(where: str, entry: Mapping[str, Any]) -> tuple[str, int]:
    raw = entry.get("quant_dtype") or "int8"  # get_calibration_config writes 'int8' when unset
    m = re.fullmatch(r"(u?int)(\d+)", str(raw))
    if not m:
        raise _error(f"{where}: quant_dtype {raw!r} is not NNI's 'intB' or 'uintB'")
    dtype, bits = m.group(1), int(m.group(2))
    qb = entry.get("quant_bits")
    if qb is not None and int(qb) != bits:
        raise _error(f"{where}: quant_bits {qb} disagrees with quant_dtype {raw!r}")
    return dtype, bits


def _import_v3(data: Mapping[str, Any], quantizer: str | None):  # noqa: ANN202
    out: dict[str, dict[str, QuantParams]] = {}
    described: dict[str, dict[str, Any]] = {}
    for module, targets in data.items():
        for target, entry in targets.items():
            where = f"NNI 3.0 calibration of {module}.{target}"
            kind = _TARGET_KIND.get(str(target))
            if kind is None:
                raise _error(
                    f"{where}: target {target!r} cannot be deployed here (only 'weight', the first input "
                    f"'_input_0' and the first output '_output_0'); remove it from the dict or the config_list"
                )
            if kind in out.get(module, {}):
                raise _error(f"{where}: module {module!r} has two targets for its {kind}")
            scale = _array(where, "scale", entry.get("scale"))
            zp = _array(where, "zero_point", entry.get("zero_point"))
            dtype, bits = _parse_dtype(where, entry)
            scheme = entry.get("quant_scheme") or "symmetric"  # NNI computes None as symmetric
            if scheme not in ("symmetric", "affine"):
                raise _error(f"{where}: quant_scheme {scheme!r} is not 'symmetric' or 'affine'")
            qmin, qmax = _nni_qrange(bits, dtype)
            grid = _Grid(dtype, bits, scheme, qmin, qmax)
            axis = _axis(where, scale, kind)
            if quantizer == "dorefa" and kind == "weight":
                params = _dorefa_weight(where, bits)
            else:
                params = _grid_params(where, scale, zp, grid, axis)
            out.setdefault(module, {})[kind] = params
            described[f"{module}.{kind}"] = {"target": str(target), **grid.describe()}
    return out, described


def _dorefa_weight(where: str, bits: int) -> QuantParams:
    """DoReFa's k-bit weights are odd multiples of ``1 / (2**k - 1)``: a signed (k+1)-bit symmetric grid
    (see deploycompress/quantization/binary.py); NNI 3.0's stored scale is that of its ``[0, 1]`` step."""
    try:
        return params_from_scale(1.0 / ((1 << bits) - 1), 0, bits=bits + 1, signed=True)
    except QuantError as exc:
        raise _error(f"{where}: {exc}") from None


# -- NNI 2.x ----------------------------------------------------------------------------------------
#: what each 2.x quantizer used when the config_list did not say (NNI's settings.py / the quantizer's code)
_V2_DEFAULTS = {
    "qat": {"weight": ("uint", "affine"), "input": ("uint", "affine"), "output": ("uint", "affine")},
    "lsq": {"weight": ("int", "symmetric"), "input": ("int", "symmetric"), "output": ("int", "symmetric")},
}


def _detect_v2(data: Mapping[str, Mapping[str, Any]]) -> tuple[str, str]:
    keys = {str(k) for e in data.values() for k in e}
    if any(k.startswith("tracked_qmin_") for k in keys):
        return "observer", "its tracked_qmin/tracked_qmax keys"
    if any(k.endswith("_scale") for k in keys):
        return "qat", "its weight_scale keys"
    weight_only = all(set(e) == {"weight_bits"} for e in data.values())
    if weight_only:
        raise _error(
            "NNI 2.x calibration with only 'weight_bits' entries was written by DoReFaQuantizer or BNNQuantizer, "
            "which export no scales: pass quantizer='dorefa' or quantizer='bnn'"
        )
    if "weight_bits" in keys:  # weights quantized but no weight scale written: LSQ's export
        return "lsq", "weight_bits without weight_scale"
    return "qat", "activation ranges only (assumed QAT; pass quantizer= to say otherwise)"


def _v2_grid(quantizer: str, kind: str, bits: int, quant_dtype: Any, quant_scheme: Any) -> _Grid:
    dtype, scheme = _V2_DEFAULTS.get(quantizer, _V2_DEFAULTS["qat"])[kind]
    given_dtype = quant_dtype.get(kind) if isinstance(quant_dtype, Mapping) else quant_dtype
    given_scheme = quant_scheme.get(kind) if isinstance(quant_scheme, Mapping) else quant_scheme
    if given_dtype is not None:
        if given_dtype not in ("int", "uint"):
            raise _error(f"quant_dtype must be NNI 2.x's 'int' or 'uint', got {given_dtype!r}")
        dtype = given_dtype
    if given_scheme is not None:
        m = re.fullmatch(r"(?:per_tensor_|per_channel_)?(symmetric|affine)", str(given_scheme))
        if not m:
            raise _error(f"quant_scheme must be one of NNI 2.x's per_tensor_affine, per_channel_symmetric, ..., got {given_scheme!r}")
        scheme = m.group(1)
    qmin, qmax = _nni_qrange(bits, dtype, narrow=quantizer != "lsq")
    return _Grid(dtype, bits, scheme, qmin, qmax)


def _import_v2(data: Mapping[str, Any], quantizer: str | None, quant_dtype: Any, quant_scheme: Any):  # noqa: ANN202
    guessed = quantizer is None
    how = "given"
    if quantizer is None:
        quantizer, how = _detect_v2(data)
    out: dict[str, dict[str, QuantParams]] = {}
    described: dict[str, dict[str, Any]] = {}
    no_weight_scale: list[str] = []
    for module, entry in data.items():
        unknown = sorted(str(k) for k in entry if not _V2_KEY.fullmatch(str(k)))
        if unknown:
            raise _error(f"NNI 2.x calibration of {module}: unknown key(s) {unknown}")
        for kind in KINDS:
            if f"{kind}_bits" not in entry:
                continue
            where = f"NNI 2.x calibration of {module}.{kind}"
            bits = int(_array(where, f"{kind}_bits", entry[f"{kind}_bits"]).reshape(-1)[0])
            lo_key, hi_key = f"tracked_min_{kind}", f"tracked_max_{kind}"
            if quantizer == "dorefa" and kind == "weight":
                params, desc = _dorefa_weight(where, bits), {"quant_bits": bits, "quantizer": "dorefa"}
            elif quantizer == "bnn" and kind == "weight":  # sign(w): +-1, a 2-bit signed grid of scale 1
                params, desc = params_from_scale(1.0, 0, bits=2, signed=True), {"quant_bits": bits, "quantizer": "bnn"}
            elif f"{kind}_scale" in entry:  # QAT weights: NNI's own scale and zero point
                scale = _array(where, f"{kind}_scale", entry[f"{kind}_scale"])
                zp = _array(where, f"{kind}_zero_point", entry.get(f"{kind}_zero_point", 0))
                grid = _v2_grid(quantizer, kind, bits, quant_dtype, quant_scheme)
                if quant_dtype is None or (isinstance(quant_dtype, Mapping) and kind not in quant_dtype):
                    # not told: a zero point above 0 is NNI's default uint affine, all zeros its int symmetric
                    signed = not bool(np.any(zp > 0))
                    dtype, scheme = ("int", "symmetric") if signed else ("uint", "affine")
                    grid = _Grid(dtype, bits, scheme, *_nni_qrange(bits, dtype))
                params = _grid_params(where, scale, zp, grid, _axis(where, scale, kind))
                desc = grid.describe()
            elif lo_key in entry and hi_key in entry:
                lo = _array(where, lo_key, entry[lo_key]).reshape(-1)
                hi = _array(where, hi_key, entry[hi_key]).reshape(-1)
                if f"tracked_qmin_{kind}" in entry:  # Observer: the grid is written out
                    qmin = int(_array(where, f"tracked_qmin_{kind}", entry[f"tracked_qmin_{kind}"]).reshape(-1)[0])
                    qmax = int(_array(where, f"tracked_qmax_{kind}", entry.get(f"tracked_qmax_{kind}")).reshape(-1)[0])
                    dtype = "int" if qmin < 0 else "uint"
                    grid = _Grid(dtype, bits, "affine", qmin, qmax)
                    full = _Grid(dtype, bits, "affine", *_nni_qrange(bits, dtype))
                else:
                    grid = full = _v2_grid(quantizer, kind, bits, quant_dtype, quant_scheme)
                scale, zp = _from_range(where, lo, hi, grid)
                params = _grid_params(where, scale, zp, full, None if scale.size == 1 else _axis(where, scale, kind))
                desc = {**grid.describe(), "tracked_min": lo.tolist(), "tracked_max": hi.tolist()}
            elif quantizer == "lsq" and kind == "weight":
                no_weight_scale.append(module)
                continue
            else:
                raise _error(f"{where}: '{kind}_bits' given without '{lo_key}'/'{hi_key}' or '{kind}_scale'")
            out.setdefault(module, {})[kind] = params
            described[f"{module}.{kind}"] = desc
    if no_weight_scale:
        warnings.warn(
            f"NNI 2.x LsqQuantizer.export_model does not write the learned weight scales "
            f"(nni/algorithms/compression/pytorch/quantization/lsq_quantizer.py): the weights of {no_weight_scale} "
            "have no calibration here; give the model to derive them from the weights, or calibrate with calib_data",
            NNIImportWarning,
            stacklevel=4,
        )
    if guessed and how.startswith("activation ranges only"):
        warnings.warn(f"NNI 2.x calibration: {how}", NNIImportWarning, stacklevel=4)
    log.info("NNI 2.x calibration read as %s (%s)", quantizer, how)
    return out, described, quantizer, no_weight_scale


def _lsq_weights_from_model(model: Any, modules: list[str], data: Mapping[str, Any]) -> dict[str, QuantParams]:
    """LSQ weights without a stored scale: symmetric signed max-abs of the weight, LSQ's full grid."""
    named = dict(model.named_modules())
    out = {}
    for name in modules:
        weight = getattr(named.get(name), "weight", None)
        if weight is None:
            raise _error(f"NNI 2.x LSQ calibration of {name}.weight: the model has no weight there")
        bits = int(_array(name, "weight_bits", data[name]["weight_bits"]).reshape(-1)[0])
        amax = float(weight.detach().abs().max())
        grid = _Grid("int", bits, "symmetric", *_nni_qrange(bits, "int", narrow=False))
        out[name] = _grid_params(f"LSQ weight of {name}", np.asarray([amax / grid.qmax if amax > 0 else 1.0]), np.zeros(1), grid, None)
    return out


def import_nni_calibration(
    data: Mapping[str, Any],
    *,
    quantizer: str | None = None,
    quant_dtype: str | Mapping[str, str] | None = None,
    quant_scheme: str | Mapping[str, str] | None = None,
    model: Any = None,
) -> tuple[dict[str, dict[str, QuantParams]], dict[str, Any]]:
    """Parse an NNI 3.0 or 2.x calibration dict: ``({module: {kind: QuantParams}}, provenance)``.

    ``quantizer`` names the NNI quantizer that wrote it (one of :data:`NNI_QUANTIZERS`); needed for
    DoReFa and BNN (their files hold only bit widths) and to say an activation-only 2.x dict came from
    LSQ; detected otherwise. ``quant_dtype``/``quant_scheme`` (NNI 2.x values, one for all kinds or
    ``{kind: value}``) are what the 2.x config_list said; they default to what the quantizer used.
    ``model`` lets LSQ 2.x weights (whose scale NNI does not export) be calibrated from the weights.
    Raises ``CalibConfigError`` naming the module, target and key.
    """
    if quantizer is not None and quantizer not in NNI_QUANTIZERS:
        raise _error(f"quantizer must be one of {list(NNI_QUANTIZERS)} (NNI's quantizer class), got {quantizer!r}")
    layout = nni_layout(data)
    if layout is None:
        raise _error("not an NNI calibration dict: expected NNI 3.0's {module: {target: {'scale', ...}}} "
                     "or NNI 2.x's {module: {'weight_bits', ...}}")
    if layout == "nni-3.0":
        modules, described = _import_v3(data, quantizer)
        used = quantizer
    else:
        modules, described, used, no_weight = _import_v2(data, quantizer, quant_dtype, quant_scheme)
        if no_weight and model is not None:
            for name, params in _lsq_weights_from_model(model, no_weight, data).items():
                modules.setdefault(name, {})["weight"] = params
                described[f"{name}.weight"] = {"derived": "max-abs of the model's weight (not in NNI's export)"}
    if not modules:
        raise _error(f"{layout} calibration dict holds no tensor to import")
    provenance = {"format": layout, "quantizer": used, "tensors": described}
    return modules, provenance
