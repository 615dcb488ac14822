"""U-ViT: a ViT where time, class and patches are all tokens, with U-Net-like long skips.

References
- [U-ViT] F. Bao et al., "All are Worth Words: A ViT Backbone for Diffusion Models", CVPR 2023,
  arXiv:2209.12152. Sec. 3 / Fig. 1: the timestep and the label are tokens; long skip
  connections between shallow and deep blocks, combined by concatenation then a linear layer
  (Sec. 3.1, the best of the variants studied); an optional 3x3 conv after unpatchify (used in
  pixel space); Table 1 sizes (S: 13 blocks x 512, M: 17 x 768, L: 21 x 1024, H: 29 x 1152).
  Code: baofff/U-ViT `libs/uvit.py` (in_blocks / mid_block / out_blocks, skip_linear,
  learned position embedding over extras + patches, trunc-normal(0.02) init of linears and
  positions, the label table left at nn.Embedding's N(0, 1), exact GELU, qkv without bias).
- [Li et al. 2024] "On the Scalability of Diffusion-based Text-to-Image Generation", CVPR
  2024: in-context conditioning (the U-ViT design) scales better than cross-attention.
- [ViT] A. Dosovitskiy et al., ICLR 2021; [Transformer] Vaswani et al. 2017, Eq. (1).

Shapes: B batch, T = (H / p)^2 patch tokens, E = 2 extra tokens (class, time), D width.
`depth` counts every block: (depth - 1) / 2 in-blocks, one mid block, (depth - 1) / 2 out-blocks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from dit_bench.backbones.family import Family
from dit_bench.backbones.layers import (
    LabelEmbedder,
    Mlp,
    PatchEmbed,
    attention,
    refuse_unread_context,
    split_heads,
    timestep_embedding,
    unpatchify,
    vit_geometry_errors,
)

if TYPE_CHECKING:
    from dit_bench.backbones import Cond

CONDITIONINGS: tuple[str, ...] = ("in_context",)


class UViTAttention(nn.Module):
    """Multi-head self-attention as U-ViT's: fused qkv without bias (qkv_bias=False), softmax
    attention (`layers.attention`), output projection with bias."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=False)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = split_heads(self.qkv(x), 3, self.num_heads)  # (B, Hd, T, d_head) each
        x = attention(q, k, v)  # (B, Hd, T, d_head)
        return self.proj(x.transpose(1, 2).reshape(b, t, d))  # (B, T, D)

    def macs(self, tokens: int) -> int:
        d = self.proj.in_features
        return tokens * d * 4 * d + 2 * tokens * tokens * d


class UViTBlock(nn.Module):
    """Pre-LN transformer block; with `skip`, first fuse the long skip:
    x = Linear([x, skip]) (2D -> D); then x = x + Attn(LN(x)); x = x + MLP(LN(x)), the MLP
    with U-ViT's exact GELU (timm's Mlp default, act_layer=nn.GELU), not DiT's tanh one."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, skip: bool = False):
        super().__init__()
        self.skip_linear = nn.Linear(2 * hidden_size, hidden_size) if skip else None
        self.norm1 = nn.LayerNorm(hidden_size)
        self.attn = UViTAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size)
        self.mlp = Mlp(hidden_size, mlp_ratio, approximate="none")  # U-ViT: exact nn.GELU

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))  # (B, E + T, D)
        x = x + self.attn(self.norm1(x))  # (B, E + T, D)
        return x + self.mlp(self.norm2(x))  # (B, E + T, D)

    def macs(self, tokens: int) -> int:
        d = self.attn.proj.in_features
        skip = tokens * 2 * d * d if self.skip_linear is not None else 0
        return skip + self.attn.macs(tokens) + self.mlp.macs(tokens)


class UViT(nn.Module):
    """U-ViT. forward(x (B, C, H, W), timesteps (B,) 0..1000, cond: Cond) -> (B, C_out, H, W).

    Tokens [class, time, patches] + a learned position embedding; in-blocks keep their outputs,
    out-blocks take them back in reverse order through the long skips; the two extra tokens are
    dropped, the rest decoded linearly to patches, unpatchified, then (with `conv`) a 3x3 conv.
    """

    # fast.blocks_of: the middle block is a block too when the block lists are empty (depth 1)
    block_types = (UViTBlock,)

    def __init__(
        self,
        *,
        image_size: int,
        in_channels: int,
        num_classes: int,
        depth: int,
        hidden_size: int,
        num_heads: int,
        patch_size: int,
        conv: bool = True,
        conditioning: str = "in_context",
        learn_sigma: bool = False,
        mlp_ratio: float = 4.0,
    ):
        super().__init__()
        if conditioning not in CONDITIONINGS:
            raise ValueError(f"conditioning={conditioning!r} for U-ViT; allowed: {CONDITIONINGS}")
        spec = dict(
            depth=depth, patch_size=patch_size, hidden_size=hidden_size, num_heads=num_heads
        )
        errors = geometry_errors(spec, image_size)
        if errors:
            raise ValueError("; ".join(errors))
        self.image_size = image_size
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.num_classes = num_classes
        self.learn_sigma = learn_sigma
        self.conditioning = conditioning
        self.patch_size = patch_size
        self.extras = 2  # class token, time token
        d = hidden_size

        self.patch_embed = PatchEmbed(image_size, patch_size, in_channels, d)
        # U-ViT's latent ImageNet models embed time without an MLP (mlp_time_embed=False): the
        # sinusoid itself is the time token.
        self.label_emb = LabelEmbedder(num_classes, d)
        tokens = self.extras + self.patch_embed.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, d))  # learned
        half = (depth - 1) // 2
        self.in_blocks = nn.ModuleList(UViTBlock(d, num_heads, mlp_ratio) for _ in range(half))
        self.mid_block = UViTBlock(d, num_heads, mlp_ratio)
        self.out_blocks = nn.ModuleList(
            UViTBlock(d, num_heads, mlp_ratio, skip=True) for _ in range(half)
        )
        self.norm = nn.LayerNorm(d)
        self.decoder_pred = nn.Linear(d, patch_size * patch_size * self.out_channels)
        self.final_layer = (
            nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1) if conv else None
        )
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """U-ViT's `_init_weights`: trunc-normal(0.02) linear weights and position embedding,
        zero biases, unit LayerNorms; PyTorch's default for the patch and final convs and for
        the label table (N(0, 1): the reference's `_init_weights` touches only Linear and
        LayerNorm). No zero init, so the output is not zero at init."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        # nn.Embedding's own N(0, 1), as U-ViT leaves it: a label token of unit scale beside
        # the time token (a sinusoid, rms ~0.7), not one 50x smaller than it
        nn.init.normal_(self.label_emb.embedding_table.weight)

    @property
    def num_tokens(self) -> int:
        return self.extras + self.patch_embed.num_patches

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, cond: Cond) -> torch.Tensor:
        refuse_unread_context(cond, "U-ViT", "the timestep and cond.labels (as tokens)")
        b = x.shape[0]
        h = self.patch_embed(x)  # (B, T, D)
        d = h.shape[-1]
        time_token = timestep_embedding(timesteps, d).to(h.dtype)[:, None]  # (B, 1, D)
        label_token = self.label_emb(cond.labels, b)[:, None]  # (B, 1, D)
        # U-ViT's order: [label, time, patches]; one learned position per token.
        h = torch.cat([label_token, time_token, h], dim=1) + self.pos_embed  # (B, E + T, D)
        skips = []
        for block in self.in_blocks:
            h = block(h)  # (B, E + T, D)
            skips.append(h)
        h = self.mid_block(h)  # (B, E + T, D)
        for block in self.out_blocks:
            h = block(h, skips.pop())  # (B, E + T, D); long skip: first out <- last in-block
        h = self.decoder_pred(self.norm(h))[:, self.extras :]  # (B, T, p*p*C_out)
        h = unpatchify(h, self.patch_size, self.out_channels)  # (B, C_out, H, W)
        return h if self.final_layer is None else self.final_layer(h)  # (B, C_out, H, W)

    def num_params(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def flops(self, batch: int = 1) -> dict[str, int]:
        """Analytic forward cost {"macs", "flops" = 2 macs}: the patch conv, every linear layer
        over all 2 + T tokens (the skip fusions included), the attention matmuls, the decoder
        over all tokens (U-ViT decodes before dropping the extras) and the final conv."""
        t = self.num_tokens
        blocks = [*self.in_blocks, self.mid_block, *self.out_blocks]
        d, out = self.decoder_pred.in_features, self.decoder_pred.out_features
        macs = self.patch_embed.macs() + sum(b.macs(t) for b in blocks) + t * d * out
        if self.final_layer is not None:
            c = self.out_channels
            macs += self.image_size**2 * c * 9 * c
        return {"macs": batch * macs, "flops": 2 * batch * macs}


def geometry_errors(spec: dict, image_size: int, prefix: str = "") -> list[str]:
    """Why the resolved U-ViT preset cannot run on image_size x image_size inputs ([] if it can).

    Patches and heads as the other patch transformers, but no width rule: U-ViT learns its
    positions, so it needs no 2-D sin-cos table. Each message names its key.
    """
    errors = vit_geometry_errors(spec, image_size, prefix, sincos_table=False)
    if spec["depth"] % 2 == 0:
        errors.append(
            f"{prefix}depth={spec['depth']} must be odd: in-blocks + mid block + out-blocks"
        )
    return errors


# ---------------------------------------------------------------------------------------------
# Presets: U-ViT Table 1 (depth counts all blocks) and small CPU sizes
# ---------------------------------------------------------------------------------------------

_SIZES = {  # name: (depth, hidden_size, num_heads, conv)
    "xs": (7, 128, 4, True),  # CPU
    "ti": (9, 192, 3, True),  # CPU
    "s": (13, 512, 8, True),  # U-ViT-S, pixel space (CIFAR-10 config: conv on)
    "m": (17, 768, 12, True),
    "l": (21, 1024, 16, False),  # latent-space ImageNet configs: conv off
    "h": (29, 1152, 16, False),
}
PRESETS: dict[str, dict] = {
    f"uvit-{size}/{patch}": dict(
        family="uvit", depth=depth, hidden_size=width, num_heads=heads, patch_size=patch, conv=conv
    )
    for size, (depth, width, heads, conv) in _SIZES.items()
    for patch in (2, 4)
}

FAMILY = Family("uvit", UViT, CONDITIONINGS, PRESETS, geometry_errors)
