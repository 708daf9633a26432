#!/usr/bin/env bash
# SDXL LoRA on the 8 devices of one machine (DDP: HCCL on Ascend NPU, NCCL on CUDA), Ascend ModelZoo style:
#   bash trainer/scripts/train_8p_text_to_image_sdxl_lora.sh                        # accuracy run, fp32
#   bash trainer/scripts/train_8p_text_to_image_sdxl_lora.sh --max_train_steps=200  # performance run
# --batch_size is per device; images/s counts all devices. Select devices with ASCEND_RT_VISIBLE_DEVICES
# (NPU) or CUDA_VISIBLE_DEVICES; --num_processes=N runs on N (>= 2) instead. Overrides and outputs: see
# run_text_to_image_sdxl_lora.sh; several machines: accelerate_config_8p.yaml.
RANK_SIZE=8
ACCELERATE_CONFIG="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/accelerate_config_8p.yaml"
source "$(dirname "${BASH_SOURCE[0]}")/run_text_to_image_sdxl_lora.sh"
