#!/usr/bin/env bash
# PSLD paper CelebA-64: 16 per GPU × 8 = 128, ~0.79M steps (500 epochs), lr 2e-4.
# The paper resizes the aligned 178×218 images DIRECTLY to 64×64 (no center crop, aspect not kept):
# that is this script's default. Add --center_crop for the usual "resize shorter side + center crop".
accelerate launch --multi_gpu --num_processes 8 --mixed_precision no training/train_psld.py \
  --train_data_dir /data/celeba/img_align_celeba_folder --resolution 64 --random_flip \
  --diffusion psld --gamma 0.005 --nu 4.005 --beta 8 --kappa 0.04 \
  --model_preset celeba64 --train_batch_size 16 --max_train_steps 790000 \
  --learning_rate 2e-4 --lr_warmup_steps 5000 --max_grad_norm 1.0 --use_ema --ema_decay 0.9999 --no-ema_warmup \
  --checkpointing_steps 10000 --checkpoints_total_limit 3 --save_images_steps 10000 --num_inference_steps 200 \
  --output_dir outputs/psld-celeba64 "$@"
