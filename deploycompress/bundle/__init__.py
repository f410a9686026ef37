"""bundle"""

__all__: list[str] = []
