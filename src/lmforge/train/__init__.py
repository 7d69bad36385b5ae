"""Training: objectives (what a step minimises), optimisers and the one loop every stage runs."""
