"""Pure-PyTorch reference implementations: the CPU fallback and the oracle of the tests. No triton."""
