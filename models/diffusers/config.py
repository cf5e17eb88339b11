"""``UNetConfig``: the subset of diffusers' ``UNet2DModel`` configuration (``unet/config.json``) that
:class:`models.diffusers.unet.UNet2DModel` implements.

Every field diffusers writes is either read here, or known and accepted only at the one value we implement
(e.g. ``time_embedding_type: "positional"``); anything else — an unsupported block type, an unknown field,
a value we do not implement — raises ``ValueError`` naming it and listing what is supported. No field is
silently ignored, so a config that loads is a network we compute exactly.
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["UNetConfig", "config_from_diffusers", "config_to_diffusers", "DOWN_BLOCKS", "UP_BLOCKS", "MID_BLOCKS"]

DOWN_BLOCKS = ("DownBlock2D", "AttnDownBlock2D")
UP_BLOCKS = ("UpBlock2D", "AttnUpBlock2D")
MID_BLOCKS = ("UNetMidBlock2D", None)
TIME_SHIFTS = ("default", "scale_shift")

# fields that carry no numerics (diffusers' bookkeeping) or are accepted at exactly one value
_BOOKKEEPING = {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values"}
_FIXED = {"time_embedding_type": "positional", "downsample_type": "conv", "upsample_type": "conv",
          "act_fn": "silu", "class_embed_type": None, "time_embedding_dim": None, "num_train_timesteps": None}


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The architecture of a diffusers ``UNet2DModel`` (field names and defaults as diffusers 0.42's).

    ``attention_head_dim=None`` means one head over all channels of a block, as in diffusers;
    ``num_class_embeds`` adds a learnt class embedding to the time embedding (class-conditional UNets)."""

    sample_size: Any = None
    in_channels: int = 3
    out_channels: int = 3
    center_input_sample: bool = False
    freq_shift: float = 0
    flip_sin_to_cos: bool = True
    down_block_types: tuple = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")
    mid_block_type: Any = "UNetMidBlock2D"
    up_block_types: tuple = ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    block_out_channels: tuple = (224, 448, 672, 896)
    layers_per_block: int = 2
    mid_block_scale_factor: float = 1.0
    downsample_padding: int = 1
    dropout: float = 0.0
    attention_head_dim: Any = 8
    norm_num_groups: Any = 32
    attn_norm_num_groups: Any = None
    norm_eps: float = 1e-5
    resnet_time_scale_shift: str = "default"
    add_attention: bool = True
    num_class_embeds: Any = None

    def __post_init__(self):
        for name in ("down_block_types", "up_block_types", "block_out_channels"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        self.validate()

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_out_channels[0]

    @property
    def num_downsamples(self) -> int:
        return len(self.block_out_channels) - 1

    def validate(self) -> None:
        bad = [t for t in self.down_block_types if t not in DOWN_BLOCKS]
        if bad:
            raise ValueError(f"unsupported down block type(s) {bad}; supported: {list(DOWN_BLOCKS)}")
        bad = [t for t in self.up_block_types if t not in UP_BLOCKS]
        if bad:
            raise ValueError(f"unsupported up block type(s) {bad}; supported: {list(UP_BLOCKS)}")
        if self.mid_block_type not in MID_BLOCKS:
            raise ValueError(f"unsupported mid_block_type {self.mid_block_type!r}; supported: {list(MID_BLOCKS)}")
        if self.resnet_time_scale_shift not in TIME_SHIFTS:
            raise ValueError(f"unsupported resnet_time_scale_shift {self.resnet_time_scale_shift!r}; "
                             f"supported: {list(TIME_SHIFTS)}")
        n = len(self.block_out_channels)
        if not (len(self.down_block_types) == len(self.up_block_types) == n) or n == 0:
            raise ValueError(f"down_block_types ({len(self.down_block_types)}), up_block_types "
                             f"({len(self.up_block_types)}) and block_out_channels ({n}) must have one equal, "
                             "non-zero length")
        if self.downsample_padding not in (0, 1):
            raise ValueError(f"downsample_padding={self.downsample_padding!r}; supported: 0, 1")
        if self.norm_num_groups is None:
            raise ValueError("norm_num_groups=None is not supported (diffusers' resnets need a number of groups)")
        groups = int(self.norm_num_groups)
        for c in self.block_out_channels:
            if c % groups:
                raise ValueError(f"block_out_channels {list(self.block_out_channels)}: {c} is not divisible by "
                                 f"norm_num_groups={groups}")
        ch = self.block_out_channels
        attended = [c for c, t in zip(ch, self.down_block_types) if t.startswith("Attn")] + \
                   [c for c, t in zip(ch[::-1], self.up_block_types) if t.startswith("Attn")] + \
                   ([ch[-1]] if self.mid_block_type is not None and self.add_attention else [])
        for c in attended:
            head = self.attention_head_dim if self.attention_head_dim is not None else c
            if c % head:
                raise ValueError(f"attention over block width {c} is not divisible by attention_head_dim={head}")
        if self.num_class_embeds is not None and int(self.num_class_embeds) < 1:
            raise ValueError(f"num_class_embeds={self.num_class_embeds!r} must be a positive integer or null")


def config_from_diffusers(raw: dict) -> UNetConfig:
    """A :class:`UNetConfig` from the dict of a diffusers ``unet/config.json``."""
    if not isinstance(raw, dict):
        raise ValueError(f"a UNet config must be a JSON object, got {type(raw).__name__}")
    cls = raw.get("_class_name", "UNet2DModel")
    if cls != "UNet2DModel":
        raise ValueError(f"_class_name {cls!r} is not supported; supported: ['UNet2DModel']")
    known = {f.name for f in dataclasses.fields(UNetConfig)}
    unknown = sorted(k for k in raw if k not in known and k not in _BOOKKEEPING and k not in _FIXED)
    if unknown:
        raise ValueError(f"unknown UNet config field(s) {unknown}; supported: {sorted(known | set(_FIXED))}")
    for key, value in _FIXED.items():
        if key in raw and raw[key] != value and not (key == "time_embedding_dim" and raw[key] ==
                                                     4 * raw.get("block_out_channels", [224])[0]):
            raise ValueError(f"{key}={raw[key]!r} is not supported; supported: {value!r}")
    return UNetConfig(**{k: v for k, v in raw.items() if k in known})


def config_to_diffusers(cfg: UNetConfig) -> dict:
    """The ``unet/config.json`` dict diffusers' ``UNet2DModel.from_pretrained`` reads for this config."""
    out = {"_class_name": "UNet2DModel", **_FIXED}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out
