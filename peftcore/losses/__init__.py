"""Losses: soft-label distillation (distill_kl) and, later, fused-linear and feature distillation."""

from .distill import distill_kl

__all__ = ["distill_kl"]
