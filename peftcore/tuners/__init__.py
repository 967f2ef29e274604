"""Adapter methods: per-method config and injection (peftcore.tuners.lora, ...)."""
