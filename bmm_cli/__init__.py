"""bmm: Bayesian Model Merging for fine-tuned checkpoints of one base model."""

__version__ = "0.1.0"
