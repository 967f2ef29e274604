"""Adapter methods: per-method config, layers' injection, and the registry that ties them in.

Importing this package registers every method (see :mod:`peftcore.tuners.base`).
"""

from . import bottleneck, lora, prompt  # noqa: F401  (each import registers its Method)
from .base import Method, method_for_config, method_for_type, methods, register_method

__all__ = ["Method", "method_for_config", "method_for_type", "methods", "register_method"]
