"""The network only: a 3D UNet conditioned on a semantic layout by channel concatenation.

The default is Lung-DDPM's architecture (guided-diffusion's ``UNetModel`` in 3D as configured by Lung-DDPM:
64 base channels, channel_mult (1, 1, 2, 3, 4), one res block per level on the way down and two on the way up,
GroupNorm(32) + SiLU, a sinusoidal timestep embedding added in every res block, one-head attention at the 16³
level and in the middle block, stride-2 convolutions down, trilinear x2 + conv up, zero-initialised output
conv: 40,226,433 parameters at 3 input channels). Module names follow that model, so a released Lung-DDPM
state dict maps onto it by a prefix change. Attention runs through ``scaled_dot_product_attention``.

Shapes: ``x`` [B, 1, D, H, W] noisy CT in [-1, 1]; ``layout`` [B, 2, D, H, W] lung and nodule channels in
{-1, 1}; ``t`` [B] integer timesteps; output [B, 1, D, H, W] (ε or v).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .encoding import CONTEXT_CHANNELS

LUNG_DDPM_TIME_MAX_PERIOD = 1000.0  # the released network's modules.timestep_embedding(..., max_period=1000)


@dataclass(frozen=True)
class UNetConfig:
    """Network hyper-parameters (defaults: the paper's)."""

    image_size: int = 128  # edge of the training grid; attention_resolutions are relative to it
    in_channels: int = 1  # image channels (the layout channels are added on top)
    layout_channels: int = 2
    out_channels: int = 1
    model_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 1, 2, 3, 4)
    num_res_blocks: int = 1
    attention_resolutions: tuple[int, ...] = (16,)
    num_heads: int = 1
    dropout: float = 0.0
    norm_groups: int = 32
    use_checkpoint: bool = False
    # the sinusoidal timestep embedding's longest period: guided-diffusion's 10000 for lungddpm's own models (what
    # they were trained with); the released Lung-DDPM network uses 1000, which its import sets
    time_max_period: float = 10000.0

    @property
    def context(self) -> bool:
        """Whether the network takes the context channels (known image, keep mask) after the layout's two."""
        return self.layout_channels == 2 + CONTEXT_CHANNELS

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels


def _groups(channels: int, wanted: int) -> int:
    """The largest group count <= ``wanted`` dividing ``channels`` (32 for the paper's widths)."""
    for g in range(min(wanted, channels), 0, -1):
        if channels % g == 0:
            return g
    return 1


def norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(_groups(channels, groups), channels)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding: t [B] -> [B, dim] (cos half first, as guided-diffusion)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepBlock(nn.Module):
    """A block whose forward also takes the timestep embedding."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class TimestepSequential(nn.Sequential):
    """Sequential that hands the embedding to the blocks that take it."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class ResBlock(TimestepBlock):
    """GroupNorm-SiLU-conv, + projected timestep embedding, GroupNorm-SiLU-dropout-conv(zero init), residual."""

    def __init__(
        self, channels: int, emb_dim: int, out_channels: int, dropout: float, groups: int, use_checkpoint: bool
    ) -> None:
        super().__init__()
        self.use_checkpoint = use_checkpoint
        self.in_layers = nn.Sequential(
            norm(channels, groups), nn.SiLU(), nn.Conv3d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_channels))
        self.out_layers = nn.Sequential(
            norm(out_channels, groups),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Conv3d(out_channels, out_channels, 3, padding=1),
        )
        nn.init.zeros_(self.out_layers[3].weight)
        nn.init.zeros_(self.out_layers[3].bias)
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv3d(channels, out_channels, 1)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).to(h.dtype)[(...,) + (None,) * 3]
        return self.skip_connection(x) + self.out_layers(h)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)


class AttentionBlock(nn.Module):
    """Self-attention over all voxels (GroupNorm, 1x1 qkv, SDPA, zero-initialised projection, residual).

    qkv channels are ordered (q, k, v) x heads x head_dim; with one head this equals guided-diffusion's legacy order.
    """

    def __init__(self, channels: int, num_heads: int, groups: int, use_checkpoint: bool) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"attention: {channels} channels are not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.use_checkpoint = use_checkpoint
        self.norm = norm(channels, groups)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        h = self.norm(x).reshape(b, c, -1)
        qkv = self.qkv(h)  # [B, 3C, T]
        heads = self.num_heads
        q, k, v = qkv.reshape(b, 3, heads, c // heads, -1).permute(1, 0, 2, 4, 3).unbind(0)  # [B, heads, T, d]
        a = F.scaled_dot_product_attention(q, k, v)  # [B, heads, T, d]
        a = a.permute(0, 1, 3, 2).reshape(b, c, -1)
        return x + self.proj_out(a).reshape(b, c, *spatial)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv3d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=False))


class UNet3D(nn.Module):
    """Layout-conditioned 3D UNet: ``forward(x, t, layout)`` -> prediction with ``x``'s shape."""

    def __init__(self, cfg: UNetConfig = UNetConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        ch = cfg.model_channels
        g = cfg.norm_groups
        emb_dim = cfg.time_embed_dim
        attention_ds = {cfg.image_size // r for r in cfg.attention_resolutions}
        self.time_embed = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        self.input_blocks = nn.ModuleList(
            [TimestepSequential(nn.Conv3d(cfg.in_channels + cfg.layout_channels, ch, 3, padding=1))]
        )
        skip_channels = [ch]
        ds = 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [
                    ResBlock(ch, emb_dim, mult * cfg.model_channels, cfg.dropout, g, cfg.use_checkpoint)
                ]
                ch = mult * cfg.model_channels
                if ds in attention_ds:
                    layers.append(AttentionBlock(ch, cfg.num_heads, g, cfg.use_checkpoint))
                self.input_blocks.append(TimestepSequential(*layers))
                skip_channels.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepSequential(Downsample(ch)))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = TimestepSequential(
            ResBlock(ch, emb_dim, ch, cfg.dropout, g, cfg.use_checkpoint),
            AttentionBlock(ch, cfg.num_heads, g, cfg.use_checkpoint),
            ResBlock(ch, emb_dim, ch, cfg.dropout, g, cfg.use_checkpoint),
        )

        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(cfg.channel_mult))[::-1]:
            for i in range(cfg.num_res_blocks + 1):
                layers = [
                    ResBlock(
                        ch + skip_channels.pop(), emb_dim, mult * cfg.model_channels, cfg.dropout, g, cfg.use_checkpoint
                    )
                ]
                ch = mult * cfg.model_channels
                if ds in attention_ds:
                    layers.append(AttentionBlock(ch, cfg.num_heads, g, cfg.use_checkpoint))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepSequential(*layers))

        self.out = nn.Sequential(norm(ch, g), nn.SiLU(), nn.Conv3d(ch, cfg.out_channels, 3, padding=1))
        nn.init.zeros_(self.out[2].weight)
        nn.init.zeros_(self.out[2].bias)

    @property
    def downsampling(self) -> int:
        """Spatial sizes must be multiples of this."""
        return downsampling(self.cfg.channel_mult)

    def forward(self, x: torch.Tensor, t: torch.Tensor, layout: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, C, D, H, W], t [B], layout [B, L, D, H, W] -> [B, out_channels, D, H, W]."""
        if any(s % self.downsampling for s in x.shape[2:]):
            raise ValueError(f"UNet3D: spatial size {tuple(x.shape[2:])} must be a multiple of {self.downsampling}")
        if layout is not None:
            x = torch.cat([x, layout.to(x.dtype)], dim=1)
        if x.shape[1] != self.cfg.in_channels + self.cfg.layout_channels:
            raise ValueError(
                f"UNet3D: {x.shape[1]} input channels, expected "
                f"{self.cfg.in_channels} image + {self.cfg.layout_channels} layout"
            )
        emb = self.time_embed(timestep_embedding(t, self.cfg.model_channels, self.cfg.time_max_period))
        h = x
        skips = []
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def downsampling(channel_mult: Sequence[int]) -> int:
    """How many times a network of ``channel_mult`` (``model.channel_mult``) halves its grid, as the factor of which
    its spatial sizes must be multiples (without building it)."""
    return 2 ** (len(channel_mult) - 1)


def unet_config_from_dict(d: dict, image_size: int) -> UNetConfig:
    """Typed network config from the validated ``model`` config section (``context``: the known image and keep mask
    as :data:`~lungddpm.diffusion.encoding.CONTEXT_CHANNELS` more layout channels)."""
    keys: Sequence[str] = ("model_channels", "num_res_blocks", "num_heads", "dropout", "norm_groups", "use_checkpoint")
    return UNetConfig(
        image_size=image_size,
        channel_mult=tuple(int(m) for m in d["channel_mult"]),
        attention_resolutions=tuple(int(r) for r in d["attention_resolutions"]),
        **{k: d[k] for k in keys},
        **({"time_max_period": float(d["time_max_period"])} if "time_max_period" in d else {}),
        **({"layout_channels": 2 + CONTEXT_CHANNELS} if d.get("context") else {}),
    )
