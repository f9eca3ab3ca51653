"""Block-wise FP8 in the GLM-5-FP8 format: quantize, dequantize, FP8 linear / experts, checkpoint conversion and
loading (through glm5.load_model). `glm5 quantize IN OUT --to fp8|bf16` is glm5.quant.cli."""

from .convert import quantize_checkpoint, save_fp8_checkpoint
from .fp8 import (BLOCK, FP8, FP8Experts, FP8Linear, dequantize, linear_fast, linear_reference, quantize,
                  quantize_act, scale_shape, set_linear_impl, weight_bytes)
from .load import fill_fp8, fp8_state_dict, quantize_model

__all__ = ["BLOCK", "FP8", "FP8Linear", "FP8Experts", "quantize", "dequantize", "quantize_act", "scale_shape",
           "linear_reference", "linear_fast", "set_linear_impl", "weight_bytes", "quantize_checkpoint",
           "save_fp8_checkpoint", "fill_fp8", "quantize_model", "fp8_state_dict"]
