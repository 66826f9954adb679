"""Module path <-> file key translation, as strings; never imports a model nor looks at a tensor.

* ``keys``: what every layout shares (component names, Kohya prefixes, key splits);
* ``kohya``: kohya / LyCORIS module names (``lora_unet_...``, ``lora_te1_...``, ``lycoris_...``);
  ``loha_diffusion.key_table`` resolves them against live modules;
* ``sgm``: SGM (original LDM) <-> diffusers UNet paths, from the UNet config;
* ``peft``: ``base_model.model.<path>.<tensor>``, the LoRA tensor renames, PEFT's adapter types;
* ``diffusers_lora``: diffusers' own ``unet.<path>.lora_A.weight`` layout.
"""
from .diffusers_lora import LORA_ADAPTER_METADATA_KEY, diffusers_lora_key, parse_diffusers_lora_key
from .keys import Target, split_key, text_model_path
from .kohya import detect_unet_naming, kohya_name
from .peft import from_peft_tensor_name, parse_peft_key, peft_key, to_peft_tensor_name
from .sgm import SgmPaths, sgm_to_diffusers_unet_map

__all__ = ["LORA_ADAPTER_METADATA_KEY", "SgmPaths", "Target", "detect_unet_naming", "diffusers_lora_key",
           "from_peft_tensor_name", "kohya_name", "parse_diffusers_lora_key", "parse_peft_key", "peft_key",
           "sgm_to_diffusers_unet_map", "split_key", "text_model_path", "to_peft_tensor_name"]
