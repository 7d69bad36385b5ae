"""Retrieval-augmented generation: indexes, retrieval, prompts with passages and citations."""
