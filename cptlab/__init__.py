"""cptlab: a lab for continual pre-training of language models."""

__version__ = "0.1.0"
