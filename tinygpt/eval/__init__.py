"""Evaluation: story grading with the oracle, task accuracy."""
