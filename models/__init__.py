"""Checked-in models, installed as package data: ``reference/`` is fmoe's trained reference model
(scripts/train_reference_model.py; docs/QUALITY.md)."""
