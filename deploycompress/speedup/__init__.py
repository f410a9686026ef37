"""speedup"""

__all__: list[str] = []
