"""CalibConfig: the calibration every later step reads (QDQ surgery, engines, bundles).

On disk it is versioned JSON::

    {"version": 1, "producer": "deploycompress 0.1.0",
     "modules": {"conv1": {"weight": {"scale": [...], "zero_point": [...], "bits": 8, "dtype": "int",
                                      "axis": 0, "symmetric": true, "min": [...], "max": [...]},
                           "input":  {...}, "output": {...}}}}

NNI's calibration dicts are accepted by :meth:`CalibConfig.from_nni` (and by ``from_dict`` and
``load``, which also reads the ``torch.save`` files NNI users keep): NNI 3.0's per-target layout and
the 2.x exports of QAT, Observer, LSQ, DoReFa and BNN, with each tensor's scale, zero point, dtype
and bits as NNI had them (see :mod:`deploycompress.quantization.nni_calib`). Where a calibration
came from is kept in ``provenance`` (written to the JSON only when set).
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

from calibrators import QuantParams

from .nni_calib import import_nni_calibration, nni_layout

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
    #: where the numbers came from, e.g. ``{"format": "nni-3.0", "quantizer": "qat", "source": path,
    #: "tensors": {"conv1.input": {"quant_dtype": "uint8", "quant_scheme": "affine", ...}}}``
    provenance: dict[str, Any] = field(default_factory=dict)

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
        out: dict[str, Any] = {"version": CALIB_VERSION, "producer": self.producer}
        if self.provenance:
            out["provenance"] = self.provenance
        out["modules"] = {m: {k: p.to_dict() for k, p in kinds.items()} for m, kinds in self.modules.items()}
        return out

    @classmethod
    def from_dict(cls, data: Any) -> "CalibConfig":
        """Parse our JSON layout, or an NNI calibration dict (3.0 per-target or 2.x flat, detected)."""
        if not isinstance(data, Mapping):
            raise CalibConfigError(f"a calibration must be a JSON object, got {type(data).__name__}")
        if "version" not in data:
            if nni_layout(data) is not None:
                return cls.from_nni(data)
            raise CalibConfigError("calibration has no 'version' field (and is not an NNI calibration dict)")
        if data["version"] != CALIB_VERSION:
            raise CalibConfigError(f"calibration version {data['version']!r} is not supported (this build reads {CALIB_VERSION})")
        modules = data.get("modules")
        if not isinstance(modules, Mapping):
            raise CalibConfigError("calibration field 'modules' is missing or not an object")
        provenance = data.get("provenance", {})
        if not isinstance(provenance, Mapping):
            raise CalibConfigError("calibration field 'provenance' must be an object")
        out = cls(producer=str(data.get("producer", "unknown")), provenance=dict(provenance))
        for module, kinds in modules.items():
            if not isinstance(kinds, Mapping):
                raise CalibConfigError(f"calibration of {module}: expected an object keyed by {list(TENSOR_KINDS)}")
            for kind, raw in kinds.items():
                if kind not in TENSOR_KINDS:
                    raise CalibConfigError(f"calibration of {module}: unknown tensor kind {kind!r}; valid: {list(TENSOR_KINDS)}")
                out.set(module, kind, _parse_params(module, kind, raw))
        return out

    @classmethod
    def from_nni(
        cls,
        data: Mapping[str, Any],
        *,
        quantizer: str | None = None,
        quant_dtype: str | Mapping[str, str] | None = None,
        quant_scheme: str | Mapping[str, str] | None = None,
        model: Any = None,
    ) -> "CalibConfig":
        """Import an NNI calibration dict: NNI 3.0's ``{module: {target: {'scale', 'zero_point',
        'quant_dtype', ...}}}`` or an NNI 2.x ``export_model`` dict (QAT, Observer, LSQ, DoReFa, BNN).

        Every tensor keeps NNI's scale, zero point, dtype and bits; 2.x activation ranges are turned
        into NNI's scale with the writing quantizer's formula. ``quantizer`` (``'qat'``, ``'lsq'``,
        ``'dorefa'``, ``'bnn'``, ...) is needed for DoReFa/BNN files, ``quant_dtype``/``quant_scheme``
        give a 2.x config_list's settings, ``model`` calibrates LSQ 2.x weights NNI did not export.
        See :func:`deploycompress.quantization.nni_calib.import_nni_calibration`.
        """
        modules, provenance = import_nni_calibration(
            data, quantizer=quantizer, quant_dtype=quant_dtype, quant_scheme=quant_scheme, model=model
        )
        out = cls(producer="nni", provenance=provenance)
        for module, kinds in modules.items():
            for kind, params in kinds.items():
                out.set(module, kind, params)
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
    def load(cls, path: str | os.PathLike[str], **nni_options: Any) -> "CalibConfig":
        """Read our JSON, an NNI calibration dict saved as JSON, or NNI's ``torch.save`` file
        (read with ``weights_only=True``; NNI 3.0's ``defaultdict`` allowed, nothing else).
        ``nni_options`` go to :meth:`from_nni` when the file is NNI's."""
        from ..nni_files import NNIFileError, load_nni_file

        path = Path(path)
        if not path.is_file():
            raise CalibConfigError(f"calibration file {str(path)!r} does not exist")
        with open(path, "rb") as fh:
            head = fh.read(2)
        if head[:2] == b"PK" or head[:1] == b"\x80":  # torch.save: a zip archive or a legacy pickle
            try:
                data = load_nni_file(path)
            except NNIFileError as exc:
                raise CalibConfigError(f"calibration file {exc}") from None
        else:
            data = read_json_file(path, "calibration file", CalibConfigError)  # size, UTF-8, JSON and depth limits
        try:
            if isinstance(data, Mapping) and "version" not in data and nni_layout(data) is not None:
                out = cls.from_nni(data, **nni_options)
                out.provenance["source"] = str(path)
                return out
            unused = sorted(k for k, v in nni_options.items() if v is not None and k != "model")
            if unused:
                raise CalibConfigError(f"calibration file {str(path)!r} is not NNI's: {unused} apply only to NNI calibrations")
            return cls.from_dict(data)
        except CalibConfigError as exc:
            raise CalibConfigError(exc if str(path) in str(exc) else f"calibration file {str(path)!r}: {exc}") from None
        except (TypeError, ValueError, KeyError, AttributeError) as exc:  # a value of the wrong type deep inside
            raise CalibConfigError(f"calibration file {str(path)!r}: {type(exc).__name__}: {exc}") from None

    def digest(self) -> str:
        """sha256 of the canonical JSON: names this calibration in manifests and reports."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

