"""Ablation sweeps: one file per question, run with `python -m resnet_flax.sweep --sweep=FILE`."""
