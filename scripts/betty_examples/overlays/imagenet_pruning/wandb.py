"""Stands in for wandb, which imagenet_pruning/util.py imports for its type hints only (``Optional[wandb.run]``);
the program never starts a run. wandb is not installed here."""

run = None
