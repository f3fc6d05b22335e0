"""Evaluation: models and measurements behind tools/evaluate.py."""
