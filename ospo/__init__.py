"""OSPO: GRPO and Owen-Shapley Policy Optimization for generative search."""

__version__ = "0.1.0"
