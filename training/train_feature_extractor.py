#!/usr/bin/env python
"""Train the offline FID/IS feature extractor (DigitsFeatureNet) on scikit-learn digits; saves safetensors.

    python training/train_feature_extractor.py --output_dir fx/digits16 --image_size 16

About 15-60 s on 2 shared CPU cores. The resulting FID/IS are NOT comparable to published
(TF-Inception) numbers; see diffusers_psld/evaluation/features.py.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from diffusers_psld.evaluation.features import train_feature_extractor  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description="Train the offline DigitsFeatureNet feature extractor")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--image_size", type=int, default=16, help="resolution of the generative model's data")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--feature_dim", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_threads", type=int, default=1)
    args = p.parse_args(argv)
    _, info = train_feature_extractor(image_size=args.image_size, epochs=args.epochs, batch_size=args.batch_size,
                                      lr=args.lr, seed=args.seed, feature_dim=args.feature_dim,
                                      output_dir=args.output_dir, num_threads=args.num_threads, verbose=True)
    with open(os.path.join(args.output_dir, "training_info.json"), "w") as f:
        json.dump(info, f, indent=2)
    print(json.dumps(info, indent=2))
    return info


if __name__ == "__main__":
    main()
