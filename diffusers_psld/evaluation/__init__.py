"""Evaluation tooling for diffusers-psld.

* :mod:`.fid` — seed-sharded, resumable sample generation from a saved pipeline and FID / IS with
  torchmetrics (standard TF-Inception when its weights are available, or the offline extractor).
* :mod:`.features` — the offline feature extractor (:class:`DigitsFeatureNet`, safetensors); its
  FID / IS are NOT comparable to published numbers.
* :mod:`.likelihood` — bits/dim through the probability-flow ODE (Hutchinson or exact divergence,
  momentum-entropy correction for PSLD/CLD, dequantisation offset log2(n_bins / 2) = 7 for 8-bit data).
"""
from .features import DigitsFeatureNet, load_digits_images, load_feature_extractor, train_feature_extractor
from .fid import (
    build_metrics,
    compute_fid_is,
    generate_shards,
    load_shards,
    pipeline_sample_fn,
    save_pngs,
    to_uint8,
)
from .likelihood import (
    LikelihoodResult,
    aux_entropy,
    bits_per_dim,
    bpd_offset,
    eps_model_score_fn,
    exact_score_fn,
    ode_likelihood,
    prior_logp,
    sample_aux,
)

__all__ = [
    "DigitsFeatureNet", "load_digits_images", "load_feature_extractor", "train_feature_extractor",
    "build_metrics", "compute_fid_is", "generate_shards", "load_shards", "pipeline_sample_fn", "save_pngs", "to_uint8",
    "LikelihoodResult", "aux_entropy", "bits_per_dim", "bpd_offset", "eps_model_score_fn", "exact_score_fn",
    "ode_likelihood", "prior_logp", "sample_aux",
]
