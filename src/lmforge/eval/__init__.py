"""Evaluation: what each stage taught (question answering by generation, ...)."""
