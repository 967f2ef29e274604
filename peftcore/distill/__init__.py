"""Knowledge distillation workflows: feature losses and the Distiller training loop."""
