"""cw_verl: CW-GRPO (covariance-weighted GRPO, arXiv 2605.11538) for verl."""

__version__ = "0.1.0"
