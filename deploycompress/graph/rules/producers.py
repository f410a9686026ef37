"""Rule of the producers: a Conv/ConvTranspose/Linear call whose weight a module owns gets new channel ids."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..channels import TensorInfo
from .registry import Call, rule, unknown

if TYPE_CHECKING:
    from ..trace import Tracer

PRODUCER_OPS = {
    "conv1d": "conv", "conv2d": "conv", "conv3d": "conv",
    "conv_transpose1d": "conv_transpose", "conv_transpose2d": "conv_transpose", "conv_transpose3d": "conv_transpose",
    "linear": "linear",
}  # fmt: skip


def is_producer_call(tracer: "Tracer", name: str, args: tuple) -> bool:
    """A producer op (or an ``embedding`` lookup) whose weight is a parameter of the model (traced even on
    untraced inputs: position ids sliced from a buffer)."""
    return (name in PRODUCER_OPS or name == "embedding") and len(args) > 1 and id(args[1]) in tracer.owner


@rule(*PRODUCER_OPS)
def producer(tracer: "Tracer", call: Call) -> None:
    if not is_producer_call(tracer, call.name, call.args):
        return unknown(tracer, call)  # a weight computed on the fly: nothing to shrink
    kind = PRODUCER_OPS[call.name]
    x, weight, out = call.args[0], call.args[1], call.out
    bias = call.arg(2, "bias")
    groups = int(call.arg(6, "groups", 1)) if kind != "linear" else 1
    in_ids, in_zero = tracer.channel_vec(x, x.dim() - 1 if kind == "linear" else 1)
    record, out_zero = tracer.record_producer(tracer.owner[id(weight)][0], kind, weight, bias, in_ids, in_zero, groups)
    if out.dim() == 0:
        tracer.set_info(out, TensorInfo.const(out.shape))
    else:
        tracer.set_info(out, TensorInfo(out.shape, out.dim() - 1 if kind == "linear" else 1, record.out_ids, out_zero))
