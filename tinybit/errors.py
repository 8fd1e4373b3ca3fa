"""The one exception hierarchy of tinybit: every error a user can cause is a TinybitError."""
import numpy as np


class TinybitError(Exception):
    """Base class: a clear, one-line message naming the file, tensor or flag and what was expected."""


class FormatError(TinybitError):
    """A model file (config.json, model.safetensors, tokenizer.json) is malformed or inconsistent."""


class ConfigError(TinybitError):
    """A configuration value is out of range or inconsistent."""


class UsageError(TinybitError):
    """A bad flag, argument or input from the caller."""


class QuantError(TinybitError):
    """A tensor cannot be quantized (NaN/Inf, wrong rank, bad parameters)."""


def is_int(v):
    """An integer (Python or NumPy), not a bool: what every count and size parameter must be."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)
