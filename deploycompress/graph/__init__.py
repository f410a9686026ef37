"""Concrete tracing and channel-dependency analysis (see ``docs/speedup.md``)."""

from .channels import CONST, TensorInfo, UnionFind
from .groups import ChannelGroup, build_channel_groups, groups_from_trace
from .trace import ChannelTrace, ParamSlice, ProducerRecord, Tracer, trace_channels

__all__ = [
    "ChannelGroup",
    "ChannelTrace",
    "ParamSlice",
    "ProducerRecord",
    "Tracer",
    "build_channel_groups",
    "groups_from_trace",
    "trace_channels",
]
