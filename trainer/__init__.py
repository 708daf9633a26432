"""SDXL LoRA training recipe of npu-kernels: ``python -m trainer.sdxl_lora`` (see ``trainer/sdxl_lora.py``)."""
