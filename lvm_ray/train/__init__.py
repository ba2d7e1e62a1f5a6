"""Training recipe (plain PyTorch) and checkpoints."""
