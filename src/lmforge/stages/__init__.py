"""Stages: each wires data, an objective and the one training loop."""
