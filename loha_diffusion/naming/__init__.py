"""Module path <-> file key translation; never looks at tensor values.

* ``kohya``: kohya / LyCORIS module names (``lora_unet_...``, ``lora_te1_...``, ``lycoris_...``),
  resolved through tables built from the live model.
* ``sgm``: SGM (original LDM) <-> diffusers UNet paths, from the UNet config.
* ``peft``: ``base_model.model.<path>.<tensor>`` and the LoRA tensor renames.
* ``diffusers_lora``: diffusers' own ``unet.<path>.lora_A.weight`` layout.
"""
from .diffusers_lora import LORA_ADAPTER_METADATA_KEY, diffusers_lora_key, parse_diffusers_lora_key
from .kohya import (KeyTable, Resolution, Target, detect_unet_naming, family_from_names, kohya_name, split_key,
                    targetable_modules, text_model_path)
from .peft import from_peft_tensor_name, parse_peft_key, peft_key, to_peft_tensor_name
from .sgm import SgmPaths, sgm_to_diffusers_unet_map

__all__ = ["KeyTable", "LORA_ADAPTER_METADATA_KEY", "Resolution", "SgmPaths", "Target", "detect_unet_naming",
           "diffusers_lora_key", "family_from_names", "from_peft_tensor_name", "kohya_name", "parse_diffusers_lora_key",
           "parse_peft_key", "peft_key", "sgm_to_diffusers_unet_map", "split_key", "targetable_modules",
           "text_model_path", "to_peft_tensor_name"]
