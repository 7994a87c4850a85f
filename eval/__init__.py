"""Evaluation, ablations and benchmarks of medvlm; added by the evaluation issue."""
