"""loha_diffusion: LoHa / LyCORIS adapters for Hugging Face diffusers."""
from .config import AdapterConfig, LoHaConfig, LoKrConfig, LoRAConfig
from .layers import AdapterLayer, AdapterWeights
from .model import LoHaModel, inject_adapter, remove_adapters
from .pipeline import (
    delete_loha_adapters,
    disable_loha,
    disable_loha_weight_cache,
    enable_loha,
    enable_loha_weight_cache,
    fuse_loha,
    get_loha_adapters,
    install_pipeline_methods,
    load_loha_weights,
    save_loha_weights,
    set_loha_adapters,
    unfuse_loha,
    unload_loha_weights,
)

install_pipeline_methods()

__version__ = "0.1.0"

__all__ = ["AdapterConfig", "AdapterLayer", "AdapterWeights", "LoHaConfig", "LoHaModel", "LoKrConfig", "LoRAConfig",
           "delete_loha_adapters", "disable_loha", "disable_loha_weight_cache", "enable_loha",
           "enable_loha_weight_cache", "fuse_loha", "get_loha_adapters",
           "inject_adapter", "load_loha_weights", "remove_adapters", "save_loha_weights", "set_loha_adapters",
           "unfuse_loha", "unload_loha_weights"]
