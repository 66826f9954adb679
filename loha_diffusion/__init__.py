"""loha_diffusion: LoHa / LyCORIS adapters for Hugging Face diffusers."""
from .config import AdapterConfig, LoHaConfig, LoRAConfig
from .layers import AdapterLayer, AdapterWeights
from .model import LoHaModel, inject_adapter, remove_adapters

__version__ = "0.1.0"

__all__ = ["AdapterConfig", "AdapterLayer", "AdapterWeights", "LoHaConfig", "LoHaModel", "LoRAConfig",
           "inject_adapter", "remove_adapters"]
