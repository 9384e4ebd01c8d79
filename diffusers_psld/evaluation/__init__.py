"""Evaluation tooling: sample generation (sharded, resumable), FID / IS via torchmetrics, PF-ODE likelihood."""
from .likelihood import (  # noqa: F401
    LikelihoodResult,
    bits_per_dim,
    bpd_offset,
    eps_model_score_fn,
    exact_score_fn,
    ode_likelihood,
)
