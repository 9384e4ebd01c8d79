#!/usr/bin/env bash
# PSLD paper AFHQv2-128 with the paper's network: NCSN++ (`ncsnpp-afhqv2-128`: nf 128, ch_mult (1,2,2,2,3),
# 2 blocks, attention at 16, dropout 0.2, positional time embedding, no FIR, no input pyramid; 65.8M parameters).
# Official script scripts_psld/ablations/uncond/afhqv2/train_uncond_psld.sh: Γ = 0.01, ν = 4.01, β = 8, κ = 0.04,
# 8 per GPU × 8 = 64, lr 1e-4, 2000 epochs (the released ckpt is epoch 1749). 512 px images resized to 128.
# The network receives the raw forward time t (--time_scale 1 from the preset).
accelerate launch --multi_gpu --num_processes 8 --mixed_precision no training/train_psld.py \
  --train_data_dir /data/afhqv2/train --resolution 128 --random_flip \
  --diffusion psld --gamma 0.01 --nu 4.01 --beta 8 --kappa 0.04 \
  --model_preset ncsnpp-afhqv2-128 --train_batch_size 8 --num_epochs 2000 \
  --learning_rate 1e-4 --lr_warmup_steps 5000 --max_grad_norm 1.0 --use_ema --ema_decay 0.9999 --no-ema_warmup \
  --checkpointing_steps 10000 --checkpoints_total_limit 3 --save_images_steps 10000 --num_inference_steps 200 \
  --output_dir outputs/psld-afhqv2-128-ncsnpp "$@"
