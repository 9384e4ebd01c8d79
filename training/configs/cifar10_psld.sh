#!/usr/bin/env bash
# PSLD paper CIFAR-10 (SOTA setting, Γ=0.02 checkpoint): 16 per GPU × 8 GPUs = 128, ~0.92M steps,
# Adam 2e-4, warm-up 5000, clip 1.0, EMA 0.9999, fp32. DDPM-size UNet preset (the paper uses NCSN++).
accelerate launch --multi_gpu --num_processes 8 --mixed_precision no training/train_psld.py \
  --dataset_name cifar10 --image_column img --resolution 32 --random_flip \
  --diffusion psld --gamma 0.02 --nu 4.02 --beta 8 --kappa 0.04 \
  --model_preset cifar10 --train_batch_size 16 --max_train_steps 920000 \
  --learning_rate 2e-4 --lr_warmup_steps 5000 --max_grad_norm 1.0 --use_ema --ema_decay 0.9999 --no-ema_warmup \
  --checkpointing_steps 10000 --checkpoints_total_limit 3 --save_images_steps 10000 --num_inference_steps 200 \
  --output_dir outputs/psld-cifar10 --report_to tensorboard "$@"
