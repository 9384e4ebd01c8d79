#!/usr/bin/env bash
# PSLD paper CelebA-64 with the paper's network: NCSN++ (`ncsnpp-celeba64`: nf 128, ch_mult (1,2,2,2), 4 blocks,
# attention at 16, dropout 0.1, residual input pyramid, FIR, Fourier features; 62.8M parameters). Official script
# scripts_psld/sota/uncond/celeba64/train_uncond_psld.sh: Γ = 0.005, ν = 4.005, β = 8, κ = 0.04,
# 16 per GPU × 8 = 128, 500 epochs (≈ 791k steps), lr 2e-4. The aligned 178×218 images are resized DIRECTLY to
# 64×64 (no center crop), as the paper does. The network receives the raw forward time t (--time_scale 1 from the preset).
accelerate launch --multi_gpu --num_processes 8 --mixed_precision no training/train_psld.py \
  --train_data_dir /data/celeba/img_align_celeba_folder --resolution 64 --random_flip \
  --diffusion psld --gamma 0.005 --nu 4.005 --beta 8 --kappa 0.04 \
  --model_preset ncsnpp-celeba64 --train_batch_size 16 --max_train_steps 791000 \
  --learning_rate 2e-4 --lr_warmup_steps 5000 --max_grad_norm 1.0 --use_ema --ema_decay 0.9999 --no-ema_warmup \
  --checkpointing_steps 10000 --checkpoints_total_limit 3 --save_images_steps 10000 --num_inference_steps 200 \
  --output_dir outputs/psld-celeba64-ncsnpp "$@"
