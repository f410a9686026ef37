"""Concrete tracing and channel-dependency analysis (see ``docs/speedup.md``)."""

from .channels import CONST, TensorInfo, UnionFind
from .groups import ChannelGroup, build_channel_groups, groups_from_trace
from .random_masks import group_keep, random_group_masks
from .trace import ChannelTrace, ParamSlice, ProducerRecord, trace_channels

__all__ = [
    "ChannelGroup",
    "ChannelTrace",
    "ParamSlice",
    "ProducerRecord",
    "build_channel_groups",
    "group_keep",
    "groups_from_trace",
    "random_group_masks",
    "trace_channels",
]
