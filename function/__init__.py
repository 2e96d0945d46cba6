from .func import new  # noqa: F401
