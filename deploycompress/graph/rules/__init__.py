"""Channel rules of the trace, one function per op family, registered by op name (see ``registry``)."""

from . import dead, elementwise, lookup, movement, norms, producers  # noqa: F401 - importing registers the rules
from .registry import Call, arg, lookup, pre_rule, pre_rules, rule, tensors, unknown

__all__ = ["Call", "arg", "lookup", "pre_rule", "pre_rules", "rule", "tensors", "unknown"]
