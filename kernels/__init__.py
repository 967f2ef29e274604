"""Triton kernels of peftcore, installed as ``peftcore.kernels`` (see pyproject's package-dir).

One module per op; each exposes the backend contract of its op as plain functions on tensors
(for LoRA: :func:`peftcore.kernels.lora.lora_fwd` and :func:`peftcore.kernels.lora.lora_bwd`).
Nothing is imported here, so ``import peftcore.kernels`` loads no triton until an op asks for it.
"""
