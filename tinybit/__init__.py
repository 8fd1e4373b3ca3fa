"""tinybit: a NumPy/Numba reference engine for 1-bit and 1.58-bit language models.

    import tinybit
    from tinybit.generate import generate
    model = tinybit.load("models/NAME")
    print(generate(model, "def fibonacci(n):", max_new_tokens=64))
"""
from .errors import ConfigError, FormatError, QuantError, TinybitError, UsageError
from .model import Model, load

__all__ = ["load", "Model", "TinybitError", "FormatError", "ConfigError", "UsageError", "QuantError"]
__version__ = "0.1.0"
