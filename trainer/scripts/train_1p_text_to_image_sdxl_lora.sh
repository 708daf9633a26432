#!/usr/bin/env bash
# SDXL LoRA on one device (Ascend NPU, CUDA GPU or CPU), Ascend ModelZoo style:
#   bash trainer/scripts/train_1p_text_to_image_sdxl_lora.sh                        # accuracy run, fp32
#   bash trainer/scripts/train_1p_text_to_image_sdxl_lora.sh --max_train_steps=200  # performance run
# Overrides and outputs: see run_text_to_image_sdxl_lora.sh. CPU smoke test on the embedded tiny assets:
#   bash trainer/scripts/train_1p_text_to_image_sdxl_lora.sh --model_name= --vae_name= --dataset_name= \
#       --resolution=64 --batch_size=2 --max_train_steps=5 --report_to=none --num_validation_images=0
RANK_SIZE=1
ACCELERATE_CONFIG="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/accelerate_config_1p.yaml"
source "$(dirname "${BASH_SOURCE[0]}")/run_text_to_image_sdxl_lora.sh"
