"""lmforge: the whole life of a language model, one machinery."""

__version__ = "0.1.0"
