"""Inference: the sampling controls and the engine that generates text from a trained model."""
