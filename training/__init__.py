"""Consistency distillation: prompts, Jacobi trajectories, training, evaluation (imports decoding, never app)."""
