"""pruning"""

__all__: list[str] = []
