"""Retraining entry point: ``python -m train --config CONFIG.json`` (see train/train.py)."""
