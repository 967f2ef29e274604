"""Losses: soft-label distillation (distill_kl) and, later, fused-linear and feature distillation."""

from .distill import distill_kl
from .fused_linear import fused_linear_distill

__all__ = ["distill_kl", "fused_linear_distill"]
