"""Evaluation: quality through lm-eval, speed and memory, side-by-side comparison of runs."""
