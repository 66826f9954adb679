"""SGM (original LDM / sd-scripts SDXL) <-> diffusers UNet module paths (docs/formats.md 1.6).

The block indices are derived from the UNet config: ``layers_per_block`` (an int or one value
per level), the down/up block types (which levels have attentions, hence the SGM upsampler
index 1 or 2) and the mid block type. The result is a map between *prefixes*: a module path
is converted by its longest mapped prefix plus the unchanged rest, which covers everything
inside an attention block (``transformer_blocks.0.attn1.to_q``, ``proj_in``, ...), while the
ResNet internals, whose names differ, are listed one by one.
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping

# diffusers ResnetBlock2D child -> SGM ResBlock child
RESNET_INTERNALS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def config_value(unet_config, key: str):
    """A value of ``unet.config`` (a FrozenDict), a plain dict or any object with attributes;
    keys the config leaves out take UNet2DConditionModel's defaults."""
    if isinstance(unet_config, Mapping):
        if key in unet_config:
            return unet_config[key]
    elif hasattr(unet_config, key):
        return getattr(unet_config, key)
    from diffusers import UNet2DConditionModel

    return inspect.signature(UNet2DConditionModel.__init__).parameters[key].default


def _has_attention(block_type: str | None) -> bool:
    return block_type is not None and "Attn" in block_type


def _per_level(value, levels: int) -> list[int]:
    return [value] * levels if isinstance(value, int) else list(value)


def _add_resnet(table: dict[str, str], sgm: str, diffusers: str) -> None:
    for diffusers_child, sgm_child in RESNET_INTERNALS.items():
        table[f"{sgm}.{sgm_child}"] = f"{diffusers}.{diffusers_child}"


def sgm_to_diffusers_unet_map(unet_config) -> dict[str, str]:
    """{SGM prefix: diffusers prefix} for a UNet2DConditionModel config.

    Attention blocks map as whole prefixes (``input_blocks.4.1`` -> ``down_blocks.1.attentions.0``),
    ResNet layers one by one (``input_blocks.1.0.in_layers.2`` -> ``down_blocks.0.resnets.0.conv1``).
    Entries may name modules a given model lacks (every ResNet gets a ``skip_connection``);
    they are never reached from a real module path.
    """
    down_types = list(config_value(unet_config, "down_block_types"))
    up_types = list(config_value(unet_config, "up_block_types"))
    mid_type = config_value(unet_config, "mid_block_type")
    layers = _per_level(config_value(unet_config, "layers_per_block"), len(down_types))

    table = {
        "input_blocks.0.0": "conv_in",
        "time_embed.0": "time_embedding.linear_1",
        "time_embed.2": "time_embedding.linear_2",
        "out.0": "conv_norm_out",
        "out.2": "conv_out",
    }
    # SGM has one label embedding; diffusers calls it add_embedding (SDXL text_time) or
    # class_embedding (a timestep/projection MLP, or an nn.Embedding for class ids).
    if config_value(unet_config, "addition_embed_type") == "text_time":
        table["label_emb.0.0"] = "add_embedding.linear_1"
        table["label_emb.0.2"] = "add_embedding.linear_2"
    class_embed_type = config_value(unet_config, "class_embed_type")
    if class_embed_type in ("timestep", "projection"):
        table["label_emb.0.0"] = "class_embedding.linear_1"
        table["label_emb.0.2"] = "class_embedding.linear_2"
    elif class_embed_type is None and config_value(unet_config, "num_class_embeds") is not None:
        table["label_emb"] = "class_embedding"

    block = 1
    for level, block_type in enumerate(down_types):
        for j in range(layers[level]):
            _add_resnet(table, f"input_blocks.{block}.0", f"down_blocks.{level}.resnets.{j}")
            if _has_attention(block_type):
                table[f"input_blocks.{block}.1"] = f"down_blocks.{level}.attentions.{j}"
            block += 1
        if level < len(down_types) - 1:
            table[f"input_blocks.{block}.0.op"] = f"down_blocks.{level}.downsamplers.0.conv"
            block += 1

    if mid_type is not None:
        if _has_attention(mid_type):
            _add_resnet(table, "middle_block.0", "mid_block.resnets.0")
            table["middle_block.1"] = "mid_block.attentions.0"
            _add_resnet(table, "middle_block.2", "mid_block.resnets.1")
        else:
            _add_resnet(table, "middle_block.0", "mid_block.resnets.0")
            _add_resnet(table, "middle_block.1", "mid_block.resnets.1")

    block = 0
    up_layers = [n + 1 for n in reversed(layers)]
    for level, block_type in enumerate(up_types):
        attention = _has_attention(block_type)
        for j in range(up_layers[level]):
            _add_resnet(table, f"output_blocks.{block}.0", f"up_blocks.{level}.resnets.{j}")
            if attention:
                table[f"output_blocks.{block}.1"] = f"up_blocks.{level}.attentions.{j}"
            block += 1
        if level < len(up_types) - 1:
            # The upsampler sits in the level's last output block, after its attention if any.
            table[f"output_blocks.{block - 1}.{2 if attention else 1}.conv"] = f"up_blocks.{level}.upsamplers.0.conv"
    return table


def convert_path(path: str, prefix_map: Mapping[str, str]) -> str | None:
    """``path`` with its longest mapped prefix (whole dotted segments) replaced, else None."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        target = prefix_map.get(".".join(parts[:cut]))
        if target is not None:
            return ".".join([target, *parts[cut:]])
    return None


class SgmPaths:
    """Both directions of the SGM <-> diffusers module path mapping for one UNet config."""

    def __init__(self, unet_config):
        self.to_diffusers_map = sgm_to_diffusers_unet_map(unet_config)
        self.to_sgm_map = {d: s for s, d in self.to_diffusers_map.items()}

    def to_diffusers(self, sgm_path: str) -> str | None:
        return convert_path(sgm_path, self.to_diffusers_map)

    def to_sgm(self, diffusers_path: str) -> str | None:
        return convert_path(diffusers_path, self.to_sgm_map)
