"""CalibConfig: the calibration every later step reads (QDQ surgery, engines, bundles).

On disk it is versioned JSON::

    {"version": 1, "producer": "deploycompress 0.1.0",
     "modules": {"conv1": {"weight": {"scale": [...], "zero_point": [...], "bits": 8, "dtype": "int",
                                      "axis": 0, "symmetric": true, "min": [...], "max": [...]},
                           "input":  {...}, "output": {...}}}}

NNI's calibration dicts (``weight_bits``, ``tracked_min_input``, ...) are accepted by
:meth:`CalibConfig.from_nni`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from calibrators import QuantError, QuantParams, params_from_range, params_from_scale

from ..checks import read_json_file
from ..errors import InputError

__all__ = ["CALIB_VERSION", "CalibConfig", "CalibConfigError", "TENSOR_KINDS"]

CALIB_VERSION = 1
TENSOR_KINDS = ("weight", "input", "output")
_FIELDS = ("scale", "zero_point", "bits", "dtype", "axis", "symmetric", "min", "max")


class CalibConfigError(InputError, ValueError):
    """A calibration that cannot be used: the message names the module, tensor and field."""


def _where(module: str, kind: str) -> str:
    return f"calibration of {module}.{kind}"


def _parse_params(module: str, kind: str, raw: Any) -> QuantParams:
    where = _where(module, kind)
    if not isinstance(raw, Mapping):
        raise CalibConfigError(f"{where}: expected an object with fields {list(_FIELDS)}, got {type(raw).__name__}")
    missing = [f for f in _FIELDS if f not in raw]
    if missing:
        raise CalibConfigError(f"{where}: missing field(s) {missing}")
    unknown = sorted(set(raw) - set(_FIELDS))
    if unknown:
        raise CalibConfigError(f"{where}: unknown field(s) {unknown}; valid fields are {list(_FIELDS)}")
    arrays = {}
    for name in ("scale", "zero_point", "min", "max"):
        value = raw[name]
        if not isinstance(value, list) or not value or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
        ):
            raise CalibConfigError(f"{where}: '{name}' must be a non-empty list of numbers, got {value!r}")
        if not all(math.isfinite(v) for v in value):
            raise CalibConfigError(f"{where}: '{name}' holds NaN or inf: {value}")
        arrays[name] = np.asarray(value, dtype=np.float64)
    lengths = {n: a.size for n, a in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise CalibConfigError(f"{where}: scale, zero_point, min and max differ in length: {lengths}")
    if np.any(arrays["scale"] <= 0):
        raise CalibConfigError(f"{where}: 'scale' must be positive, got {arrays['scale'].tolist()}")
    if np.any(arrays["min"] > arrays["max"]):
        raise CalibConfigError(f"{where}: 'min' exceeds 'max'")
    bits, dtype, axis, symmetric = raw["bits"], raw["dtype"], raw["axis"], raw["symmetric"]
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
        raise CalibConfigError(f"{where}: 'bits' must be an integer from 2 to 16, got {bits!r}")
    if dtype not in ("int", "uint"):
        raise CalibConfigError(f"{where}: 'dtype' must be 'int' or 'uint', got {dtype!r}")
    if axis is not None and (isinstance(axis, bool) or not isinstance(axis, int)):
        raise CalibConfigError(f"{where}: 'axis' must be null or an integer, got {axis!r}")
    if axis is None and lengths["scale"] != 1:
        raise CalibConfigError(f"{where}: per-tensor ('axis': null) needs one scale, got {lengths['scale']}")
    if not isinstance(symmetric, bool):
        raise CalibConfigError(f"{where}: 'symmetric' must be true or false, got {symmetric!r}")
    zp = arrays["zero_point"]
    qmin, qmax = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if dtype == "int" else (0, (1 << bits) - 1)
    if np.any(zp != np.round(zp)) or np.any(zp < qmin) or np.any(zp > qmax):
        raise CalibConfigError(f"{where}: 'zero_point' must be integers in [{qmin}, {qmax}], got {zp.tolist()}")
    return QuantParams(
        scale=arrays["scale"].astype(np.float32),
        zero_point=zp.astype(np.int64),
        bits=bits,
        dtype=dtype,
        axis=axis,
        min=arrays["min"].astype(np.float32),
        max=arrays["max"].astype(np.float32),
        symmetric=symmetric,
    )


@dataclass
class CalibConfig:
    """Quantization parameters per module and tensor kind (``weight``, ``input``, ``output``)."""

    modules: dict[str, dict[str, QuantParams]] = field(default_factory=dict)
    producer: str = "deploycompress"

    # -- access -------------------------------------------------------------------------------
    def set(self, module: str, kind: str, params: QuantParams) -> None:
        if kind not in TENSOR_KINDS:
            raise CalibConfigError(f"tensor kind must be one of {list(TENSOR_KINDS)}, got {kind!r}")
        if not isinstance(module, str) or not module:
            raise CalibConfigError(f"module name must be a non-empty string, got {module!r}")
        if not isinstance(params, QuantParams):
            raise CalibConfigError(f"{_where(module, kind)}: expected QuantParams, got {type(params).__name__}")
        self.modules.setdefault(module, {})[kind] = params

    def get(self, module: str, kind: str) -> QuantParams | None:
        return self.modules.get(module, {}).get(kind)

    def items(self) -> Iterator[tuple[str, str, QuantParams]]:
        for module, kinds in self.modules.items():
            for kind, params in kinds.items():
                yield module, kind, params

    def __len__(self) -> int:
        return sum(len(k) for k in self.modules.values())

    # -- (de)serialisation --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "version": CALIB_VERSION,
            "producer": self.producer,
            "modules": {m: {k: p.to_dict() for k, p in kinds.items()} for m, kinds in self.modules.items()},
        }

    @classmethod
    def from_dict(cls, data: Any) -> "CalibConfig":
        """Parse our JSON layout, or NNI's calibration dict (detected by its ``*_bits`` keys)."""
        if not isinstance(data, Mapping):
            raise CalibConfigError(f"a calibration must be a JSON object, got {type(data).__name__}")
        if "version" not in data:
            if data and all(isinstance(v, Mapping) and any(str(k).endswith("_bits") for k in v) for v in data.values()):
                return cls.from_nni(data)
            raise CalibConfigError("calibration has no 'version' field (and is not an NNI calibration dict)")
        if data["version"] != CALIB_VERSION:
            raise CalibConfigError(f"calibration version {data['version']!r} is not supported (this build reads {CALIB_VERSION})")
        modules = data.get("modules")
        if not isinstance(modules, Mapping):
            raise CalibConfigError("calibration field 'modules' is missing or not an object")
        out = cls(producer=str(data.get("producer", "unknown")))
        for module, kinds in modules.items():
            if not isinstance(kinds, Mapping):
                raise CalibConfigError(f"calibration of {module}: expected an object keyed by {list(TENSOR_KINDS)}")
            for kind, raw in kinds.items():
                if kind not in TENSOR_KINDS:
                    raise CalibConfigError(f"calibration of {module}: unknown tensor kind {kind!r}; valid: {list(TENSOR_KINDS)}")
                out.set(module, kind, _parse_params(module, kind, raw))
        return out

    @classmethod
    def from_nni(cls, data: Mapping[str, Any], *, symmetric: bool = True) -> "CalibConfig":
        """Import NNI's ``{module: {'weight_bits', 'weight_scale', 'tracked_min_input', ...}}``.

        Activations are rebuilt from the tracked ranges; weights from ``weight_scale``/``weight_zero_point``
        when present, else from ``tracked_min_weight``/``tracked_max_weight``.
        """
        out = cls(producer="nni")
        for module, entry in data.items():
            if not isinstance(entry, Mapping):
                raise CalibConfigError(f"NNI calibration of {module}: expected a dict, got {type(entry).__name__}")
            for kind in TENSOR_KINDS:
                bits_key = f"{kind}_bits"
                if bits_key not in entry:
                    continue
                bits = int(_scalar(module, bits_key, entry[bits_key]))
                lo_key, hi_key = f"tracked_min_{kind}", f"tracked_max_{kind}"
                try:
                    if lo_key in entry and hi_key in entry:
                        lo = np.asarray(_array(module, lo_key, entry[lo_key]))
                        hi = np.asarray(_array(module, hi_key, entry[hi_key]))
                        axis = 0 if lo.size > 1 else None
                        out.set(module, kind, params_from_range(lo, hi, bits=bits, symmetric=symmetric, axis=axis))
                    elif f"{kind}_scale" in entry:
                        scale = np.asarray(_array(module, f"{kind}_scale", entry[f"{kind}_scale"]), dtype=np.float64)
                        zp = np.asarray(_array(module, f"{kind}_zero_point", entry.get(f"{kind}_zero_point", 0)))
                        zp = np.broadcast_to(zp, scale.shape)
                        # NNI writes uint8 affine (zero point > 0) or int8 symmetric (zero point 0)
                        signed = not bool(np.any(zp > 0))
                        axis = 0 if scale.size > 1 else None
                        out.set(module, kind, params_from_scale(scale, zp, bits=bits, signed=signed, axis=axis))
                    else:
                        raise CalibConfigError(
                            f"NNI calibration of {module}: '{bits_key}' given without '{lo_key}'/'{hi_key}' or '{kind}_scale'"
                        )
                except QuantError as exc:
                    raise CalibConfigError(f"NNI calibration of {module}.{kind}: {exc}") from None
        if not len(out):
            raise CalibConfigError("NNI calibration dict holds no '<kind>_bits' entries")
        return out

    def validate(self, model: Any = None) -> None:
        """Check the calibration against ``model`` (anything with ``named_modules``): every module exists,
        and per-channel weight parameters have one scale per channel of the weight's axis."""
        for module, kind, params in self.items():
            where = _where(module, kind)
            if params.axis is not None and params.scale.size != params.zero_point.size:
                raise CalibConfigError(f"{where}: {params.scale.size} scales but {params.zero_point.size} zero points")
        if model is None:
            return
        modules = dict(model.named_modules())
        missing = sorted(m for m in self.modules if m not in modules)
        if missing:
            raise CalibConfigError(f"calibration names module(s) the model lacks: {missing}")
        for module, kind, params in self.items():
            weight = getattr(modules[module], "weight", None)
            if kind != "weight":
                continue
            if weight is None:
                raise CalibConfigError(f"{_where(module, kind)}: module {module!r} has no weight")
            if params.axis is not None:
                if not -weight.dim() <= params.axis < weight.dim():
                    raise CalibConfigError(f"{_where(module, kind)}: axis {params.axis} is out of range for weight shape {tuple(weight.shape)}")
                if weight.shape[params.axis] != params.scale.size:
                    raise CalibConfigError(
                        f"{_where(module, kind)}: {params.scale.size} scales on axis {params.axis}, "
                        f"but the weight has {weight.shape[params.axis]} channels there"
                    )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=False)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write atomically (temp file, then rename): a crash never leaves half a file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(self.to_json())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "CalibConfig":
        data = read_json_file(path, "calibration file", CalibConfigError)  # size, UTF-8, JSON and depth limits
        try:
            return cls.from_dict(data)
        except CalibConfigError as exc:
            raise CalibConfigError(f"calibration file {str(path)!r}: {exc}") from None
        except (TypeError, ValueError, KeyError, AttributeError) as exc:  # a value of the wrong type deep inside
            raise CalibConfigError(f"calibration file {str(path)!r}: {type(exc).__name__}: {exc}") from None

    def digest(self) -> str:
        """sha256 of the canonical JSON: names this calibration in manifests and reports."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


def _array(module: str, key: str, value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor from an NNI checkpoint
        value = value.detach().cpu().numpy()
    try:
        arr = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise CalibConfigError(f"NNI calibration of {module}: '{key}' must be a number or a list of numbers, got {value!r}") from None
    if arr.size == 0 or not np.all(np.isfinite(arr)):
        raise CalibConfigError(f"NNI calibration of {module}: '{key}' is empty or not finite: {arr.tolist()}")
    return arr


def _scalar(module: str, key: str, value: Any) -> float:
    arr = _array(module, key, value)
    if arr.size != 1:
        raise CalibConfigError(f"NNI calibration of {module}: '{key}' must be a single number")
    return float(arr[0])
