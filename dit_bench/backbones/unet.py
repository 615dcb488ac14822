"""ADM U-Net: the convolutional baseline of Dhariwal & Nichol 2021 ("guided diffusion").

References
- [ADM] P. Dhariwal, A. Nichol, "Diffusion Models Beat GANs on Image Synthesis", NeurIPS 2021,
  arXiv:2105.05233. Sec. 3 (architecture improvements): residual blocks with adaptive group
  normalisation AdaGN(h, y) = y_s GroupNorm(h) + y_b, (y_s, y_b) from the timestep + class
  embedding (Sec. 3.1, "scale-shift norm"); BigGAN residual blocks for up- and downsampling;
  attention at 32, 16 and 8 pixel resolution with 64 channels per head; Table 9 / App. hyper-
  parameters (ImageNet 256: 256 base channels, 2 res blocks, multipliers 1,1,2,2,4,4; ~554M
  parameters). Code: openai/guided-diffusion `unet.py` (UNetModel, ResBlock, AttentionBlock,
  QKVAttentionLegacy, zero_module), whose module names and attention layout are used here.
- [IDDPM] A. Nichol, P. Dhariwal, ICML 2021: learned variance (2C outputs).
- [CFG] J. Ho, T. Salimans, 2022: the null class (an extra row of the label table).

Presets give the channel ladder: `hidden_size` = base channels (ADM's model_channels), `depth` =
residual blocks per level, `channel_mult` per level, attention at the downsampling factors in
`attention_ds` (ADM's attention_resolutions as image_size // resolution), `head_channels`.

Shapes: B batch, C channels, N = H = W side at the current level, E = 4 * base time-embedding.
Level l = 0 .. L-1 (L = len(channel_mult)) has C_l = channel_mult[l] * base channels at side
N_l = H / 2^l; N' is a block's output side (2N after upsampling, N/2 after downsampling).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from dit_bench.backbones.family import Family
from dit_bench.backbones.layers import (
    LabelEmbedder,
    attention,
    refuse_unread_context,
    timestep_embedding,
)

if TYPE_CHECKING:
    from dit_bench.backbones import Cond

CONDITIONINGS: tuple[str, ...] = ("adagn",)


def group_norm(channels: int) -> nn.GroupNorm:
    """ADM's `normalization`: GroupNorm with 32 groups."""
    return nn.GroupNorm(32, channels)


# ---------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------


class ResBlock(nn.Module):
    """Residual block with scale-shift norm (AdaGN) and optional BigGAN-style resampling [ADM].

        h = conv3x3(resample(SiLU(GN(x))))
        scale, shift = Linear(SiLU(emb))
        h = conv3x3_zero(SiLU(GN(h) * (1 + scale) + shift))
        out = skip(resample(x)) + h
    resample is nearest 2x upsampling or 2x2 average pooling (no weights); skip is a 1x1 conv when
    the channel count changes. The last conv is zero-initialised, so the block starts as skip.
    """

    def __init__(self, channels: int, emb_channels: int, out_channels: int, resample: str = ""):
        super().__init__()
        self.resample = resample  # "", "up" or "down"
        self.in_layers = nn.Sequential(
            group_norm(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels))
        self.out_layers = nn.Sequential(
            group_norm(out_channels),
            nn.SiLU(),
            # Off for every preset. ADM trained its 128-512 px ImageNet models without
            # dropout but its 64 px one (unet-adm64) with 0.1: here a step's random draws all
            # come from the step generator (resumes repeat them), which dropout would bypass
            nn.Dropout(0.0),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        if out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, 1)

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2, mode="nearest")  # (B, C, 2N, 2N)
        if self.resample == "down":
            return F.avg_pool2d(x, kernel_size=2, stride=2)  # (B, C, N/2, N/2)
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers[:-1](x)  # GN, SiLU: (B, C, N, N)
        h = self.in_layers[-1](self._resample(h))  # (B, C_out, N', N')
        scale, shift = self.emb_layers(emb)[..., None, None].chunk(2, dim=1)  # (B, C_out, 1, 1)
        h = self.out_layers[0](h) * (1 + scale) + shift  # AdaGN: (B, C_out, N', N')
        h = self.out_layers[1:](h)  # (B, C_out, N', N')
        return self.skip_connection(self._resample(x)) + h  # (B, C_out, N', N')

    def zero_init(self) -> None:
        nn.init.zeros_(self.out_layers[-1].weight)  # ADM's zero_module
        nn.init.zeros_(self.out_layers[-1].bias)

    def out_side(self, side: int) -> int:
        return {"up": 2 * side, "down": side // 2}.get(self.resample, side)

    def macs(self, side: int) -> int:
        n = self.out_side(side) ** 2  # both convs and the skip run at the output resolution
        c_in, c_out = self.in_layers[-1].in_channels, self.in_layers[-1].out_channels
        macs = n * c_in * 9 * c_out + n * c_out * 9 * c_out
        macs += self.emb_layers[-1].in_features * self.emb_layers[-1].out_features
        if isinstance(self.skip_connection, nn.Conv2d):
            macs += n * c_in * c_out
        return macs


class AttentionBlock(nn.Module):
    """Spatial self-attention over the N*N positions of a level, residual [ADM `AttentionBlock`].

    x + proj_out(attention(qkv(GN(x)))), qkv and proj_out as 1x1 Conv1d; heads of
    `head_channels` channels in ADM's legacy layout (the 3C qkv channels are grouped per head as
    [q_h, k_h, v_h]). proj_out is zero-initialised.
    """

    def __init__(self, channels: int, head_channels: int):
        super().__init__()
        self.num_heads = channels // head_channels
        self.norm = group_norm(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        b, c, *spatial = x.shape
        h = x.reshape(b, c, -1)  # (B, C, T), T = N * N
        qkv = self.qkv(self.norm(h))  # (B, 3C, T)
        t = qkv.shape[-1]
        qkv = qkv.reshape(b, self.num_heads, 3 * c // self.num_heads, t)  # (B, Hd, 3 ch, T)
        q, k, v = qkv.transpose(2, 3).chunk(3, dim=-1)  # (B, Hd, T, ch) each
        a = attention(q, k, v)  # (B, Hd, T, ch)
        a = a.transpose(2, 3).reshape(b, c, t)  # (B, C, T)
        return (h + self.proj_out(a)).reshape(b, c, *spatial)  # (B, C, N, N)

    def zero_init(self) -> None:
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def out_side(self, side: int) -> int:
        return side

    def macs(self, side: int) -> int:
        c, t = self.proj_out.in_channels, side * side
        return t * c * 3 * c + 2 * t * t * c + t * c * c


class EmbedSequential(nn.ModuleList):
    """Layers run in order; residual blocks also receive the embedding (ADM's
    TimestepEmbedSequential)."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            # (B, C, N, N) -> (B, C', N', N'): the stem conv or a ResBlock may change C, a
            # resampling ResBlock N
            x = layer(x, emb) if isinstance(layer, ResBlock | AttentionBlock) else layer(x)
        return x

    def out_side(self, side: int) -> int:
        for layer in self:
            side = layer.out_side(side) if hasattr(layer, "out_side") else side
        return side

    def macs(self, side: int) -> int:
        total = 0
        for layer in self:
            if isinstance(layer, nn.Conv2d):  # the stem conv
                total += side * side * layer.in_channels * 9 * layer.out_channels
            else:
                total += layer.macs(side)
                side = layer.out_side(side)
        return total


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


class UNet(nn.Module):
    """ADM U-Net. forward(x (B, C, H, W), timesteps (B,) 0..1000, cond: Cond) -> (B, C_out, H, W).

    The embedding is time_embed(sinusoid(t)) + label_emb(y) (E = 4 * base channels) and drives
    every residual block's scale-shift norm. Encoder activations are kept and concatenated to
    the decoder's inputs at the same resolution. The output conv is zero-initialised.
    """

    def __init__(
        self,
        *,
        image_size: int,
        in_channels: int,
        num_classes: int,
        depth: int,
        hidden_size: int,
        channel_mult: tuple[int, ...],
        attention_ds: tuple[int, ...],
        head_channels: int,
        conditioning: str = "adagn",
        learn_sigma: bool = False,
    ):
        super().__init__()
        if conditioning not in CONDITIONINGS:
            raise ValueError(
                f"conditioning={conditioning!r} for the U-Net; allowed: {CONDITIONINGS}"
            )
        channel_mult, attention_ds = tuple(channel_mult), tuple(attention_ds)  # YAML gives lists
        spec = dict(hidden_size=hidden_size, channel_mult=channel_mult, head_channels=head_channels)
        errors = geometry_errors(dict(spec, attention_ds=attention_ds), image_size)
        if errors:
            raise ValueError("; ".join(errors))
        self.image_size = image_size
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.num_classes = num_classes
        self.learn_sigma = learn_sigma
        self.conditioning = conditioning
        base = hidden_size
        emb = 4 * base

        self.time_embed = nn.Sequential(nn.Linear(base, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.label_emb = LabelEmbedder(num_classes, emb)

        ch = base
        self.input_blocks = nn.ModuleList([EmbedSequential([nn.Conv2d(in_channels, ch, 3, 1, 1)])])
        skip_chans, ds = [ch], 1
        for level, mult in enumerate(channel_mult):
            for _ in range(depth):
                layers = [ResBlock(ch, emb, mult * base)]
                ch = mult * base
                if ds in attention_ds:
                    layers.append(AttentionBlock(ch, head_channels))
                self.input_blocks.append(EmbedSequential(layers))
                skip_chans.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(EmbedSequential([ResBlock(ch, emb, ch, "down")]))
                skip_chans.append(ch)
                ds *= 2
        self.middle_block = EmbedSequential(
            [ResBlock(ch, emb, ch), AttentionBlock(ch, head_channels), ResBlock(ch, emb, ch)]
        )
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(depth + 1):
                layers = [ResBlock(ch + skip_chans.pop(), emb, mult * base)]
                ch = mult * base
                if ds in attention_ds:
                    layers.append(AttentionBlock(ch, head_channels))
                if level and i == depth:
                    layers.append(ResBlock(ch, emb, ch, "up"))
                    ds //= 2
                self.output_blocks.append(EmbedSequential(layers))
        self.out = nn.Sequential(
            group_norm(ch), nn.SiLU(), nn.Conv2d(ch, self.out_channels, 3, padding=1)
        )
        self.base_channels = base
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """ADM keeps PyTorch's default init and zero-initialises every residual branch's last
        layer (ResBlock out conv, attention proj_out) and the output conv (`zero_module`)."""
        for m in self.modules():
            if isinstance(m, ResBlock | AttentionBlock):
                m.zero_init()
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    @property
    def num_tokens(self) -> int:
        """No tokens: the input's pixel positions, reported for the tables."""
        return self.image_size**2

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, cond: Cond) -> torch.Tensor:
        refuse_unread_context(cond, "U-Net", "the timestep and cond.labels (scale-shift norm)")
        b = x.shape[0]
        freq = timestep_embedding(timesteps, self.base_channels)  # (B, base)
        emb = self.time_embed(freq.to(x.dtype)) + self.label_emb(cond.labels, b)  # (B, E)
        # Encoder: the stem (B, base, H, W), then per level `depth` blocks and, except on the
        # last level, a downsampling block; every output is kept for the decoder.
        skips, h = [], x
        for block in self.input_blocks:
            h = block(h, emb)  # (B, C_l, N_l, N_l); a level's down block ends at N_{l+1}
            skips.append(h)
        h = self.middle_block(h, emb)  # (B, C_{L-1}, N_{L-1}, N_{L-1})
        # Decoder, levels in reverse, depth + 1 blocks each: every block takes back the last
        # kept encoder output, which always has the side h has.
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)  # (B, C + C_skip, N_l, N_l)
            h = block(h, emb)  # (B, C_l, N_l, N_l); a level's last block upsamples to N_{l-1}
        return self.out(h)  # (B, C_out, H, W)

    def num_params(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def flops(self, batch: int = 1) -> dict[str, int]:
        """Analytic forward cost {"macs", "flops" = 2 macs}: every convolution (3x3, 1x1, the
        attention's Conv1d), the linear layers (time MLP and per-block embedding projections,
        once per sample) and the two attention matmuls; not GroupNorm, SiLU, resampling."""
        base = self.base_channels
        macs = base * 4 * base + 4 * base * 4 * base  # time MLP
        side = self.image_size
        for block in self.input_blocks:
            macs += block.macs(side)
            side = block.out_side(side)
        macs += self.middle_block.macs(side)
        for block in self.output_blocks:
            macs += block.macs(side)
            side = block.out_side(side)
        macs += side * side * self.out[-1].in_channels * 9 * self.out_channels
        return {"macs": batch * macs, "flops": 2 * batch * macs}


def geometry_errors(spec: dict, image_size: int, prefix: str = "") -> list[str]:
    """Why the resolved U-Net preset cannot run on image_size x image_size inputs ([] if it can)."""
    errors = []
    mult, width = spec["channel_mult"], spec["hidden_size"]
    # Config errors (prefix "backbone.") name the config's key for the size; direct builds the
    # argument. channel_mult and attention_ds come with the preset, chosen by `name`.
    size_key = "data.image_size" if prefix else "image_size"
    factor = 2 ** (len(mult) - 1)
    if image_size % factor:
        errors.append(
            f"{size_key}={image_size} is not divisible by {factor}: the U-Net preset "
            f"({prefix}name) has channel_mult={tuple(mult)} and halves the size {len(mult) - 1} "
            f"times; use a multiple of {factor} or a preset with fewer levels"
        )
    if width % 32:
        errors.append(f"{prefix}hidden_size={width} must be a multiple of 32 (GroupNorm(32))")
    heads = spec["head_channels"]
    for ds in spec["attention_ds"]:
        level = int(math.log2(ds)) if ds > 0 and ds & (ds - 1) == 0 else -1
        if not 0 <= level < len(mult):
            allowed = [2**i for i in range(len(mult))]
            errors.append(
                f"attention_ds={ds} of the U-Net preset ({prefix}name) is not one of its "
                f"downsampling factors {allowed}"
            )
        elif (mult[level] * width) % heads:
            errors.append(
                f"{prefix}hidden_size={width} x {mult[level]} channels is not divisible by "
                f"{heads} channels per head"
            )
    return errors


# ---------------------------------------------------------------------------------------------
# Presets: small CPU ladders and ADM's ImageNet configurations
# ---------------------------------------------------------------------------------------------

PRESETS: dict[str, dict] = {
    # CPU: attention at 8x8 of a 32x32 input.
    "unet-xs": dict(
        family="unet", depth=1, hidden_size=32, channel_mult=(1, 2, 2),
        attention_ds=(4,), head_channels=32,
    ),
    "unet-s": dict(
        family="unet", depth=2, hidden_size=64, channel_mult=(1, 2, 2, 2),
        attention_ds=(2, 4), head_channels=32,
    ),
    # ADM ImageNet 64x64 (296M) and 256x256 (554M): attention at 32, 16, 8 pixels. Their
    # architectures exactly; ADM trained the 64x64 one with dropout 0.1, here none (ResBlock).
    "unet-adm64": dict(
        family="unet", depth=3, hidden_size=192, channel_mult=(1, 2, 3, 4),
        attention_ds=(2, 4, 8), head_channels=64,
    ),
    "unet-adm256": dict(
        family="unet", depth=2, hidden_size=256, channel_mult=(1, 1, 2, 2, 4, 4),
        attention_ds=(8, 16, 32), head_channels=64,
    ),
}  # fmt: skip

FAMILY = Family("unet", UNet, CONDITIONINGS, PRESETS, geometry_errors, token_stream=False)
