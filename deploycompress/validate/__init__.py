"""validate"""

__all__: list[str] = []
