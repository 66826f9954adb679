"""Adapters on layers: the tensors (``weights``), the layer (``layer``), its two compute paths
and their cost model (``paths``), the fuse state (``merge``) and the inference cache (``cache``)."""
from .layer import LOADABLE_LAYERS, AdapterLayer
from .paths import SUPPORTED_LAYERS
from .weights import AdapterWeights

__all__ = ["LOADABLE_LAYERS", "SUPPORTED_LAYERS", "AdapterLayer", "AdapterWeights"]
