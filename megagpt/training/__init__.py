"""The training loop, optimizer, precision, checkpoints and metrics."""
