"""DiT: the Diffusion Transformer, as Peebles & Xie 2023 (facebookresearch/DiT `models.py`).

References
- [DiT] W. Peebles, S. Xie, "Scalable Diffusion Models with Transformers", ICCV 2023,
  arXiv:2212.09748. Sec. 3.2 "DiT block design" (adaLN-Zero: regress shift/scale/gate from
  t + y, zero-init so every block starts as the identity); Fig. 3 (block); Table 1 (the S/B/L/XL
  sizes); Table 4 (Gflops of the 12 configurations, reproduced by `DiT.flops`).
  Code: facebookresearch/DiT `models.py` (init rules, key names, unpatchify).
- [ViT] A. Dosovitskiy et al., ICLR 2021: patchify + transformer over tokens.
- [IDDPM] A. Nichol, P. Dhariwal, ICML 2021: learned variance; with `learn_sigma` the output
  has 2*C channels, eps first, then the variance interpolation values v.

Layout: the conditioning schemes -> blocks -> final layer -> model -> builder. The conditioning
scheme is one string (`conditioning=`) that selects the block class from `BLOCKS`; a new scheme
(adaln, cross_attn, in_context) is one block class plus one line in `BLOCKS`.

Shapes: B batch, C channels, H = W image side, p patch, G = H / p, T = G * G tokens, D width.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from dit_bench.backbones.layers import (
    Attention,
    LabelEmbedder,
    Mlp,
    PatchEmbed,
    TimestepEmbedder,
    modulate,
    sincos_pos_embed_2d,
    unpatchify,
)

if TYPE_CHECKING:  # Cond lives in the package __init__, which imports this module
    from dit_bench.backbones import Cond

# ---------------------------------------------------------------------------------------------
# Blocks, one class per conditioning scheme
# ---------------------------------------------------------------------------------------------


class AdaLNZeroBlock(nn.Module):
    """DiT block with adaLN-Zero conditioning [DiT Sec. 3.2, Fig. 3 right].

    From c = t_emb + y_emb (B, D) a zero-initialised SiLU-Linear regresses, per sample,
    (shift, scale, gate) for the attention branch and for the MLP branch:
        x = x + gate_msa * Attn(modulate(LN(x), shift_msa, scale_msa))
        x = x + gate_mlp * MLP(modulate(LN(x), shift_mlp, scale_mlp))
    Zero gates make each residual branch vanish at init, so the block is the identity.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        # No affine parameters: scale and shift come from the conditioning instead.
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        mods = self.adaLN_modulation(c).chunk(6, dim=1)  # 6 x (B, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        h = self.attn(modulate(self.norm1(x), shift_msa, scale_msa))  # (B, T, D)
        x = x + gate_msa.unsqueeze(1) * h  # (B, T, D)
        h = self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # (B, T, D)
        return x + gate_mlp.unsqueeze(1) * h  # (B, T, D)

    def zero_init(self) -> None:
        # adaLN-Zero: shift = scale = gate = 0 at init, so the residual branches vanish.
        nn.init.zeros_(self.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.adaLN_modulation[-1].bias)

    def macs(self, tokens: int) -> int:
        d = self.adaLN_modulation[-1].in_features
        # The modulation runs once per sample, not per token: D * 6D.
        return self.attn.macs(tokens) + self.mlp.macs(tokens) + d * 6 * d


# conditioning name -> block class. The registry in `dit_bench.backbones` reads its keys.
BLOCKS: dict[str, type[nn.Module]] = {
    "adaln_zero": AdaLNZeroBlock,
}
CONDITIONINGS: tuple[str, ...] = tuple(BLOCKS)


# ---------------------------------------------------------------------------------------------
# Final layer
# ---------------------------------------------------------------------------------------------


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm then a linear map from each token to its p*p*C_out pixels."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # 2 x (B, D)
        x = modulate(self.norm_final(x), shift, scale)  # (B, T, D)
        return self.linear(x)  # (B, T, p*p*C_out)

    def zero_init(self) -> None:
        # Zero output layer: the network predicts exactly 0 at init [DiT Sec. 3.2].
        for layer in (self.adaLN_modulation[-1], self.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def macs(self, tokens: int) -> int:
        d = self.linear.in_features
        return tokens * d * self.linear.out_features + d * 2 * d


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


class DiT(nn.Module):
    """Diffusion Transformer over a square image or latent.

    forward(x (B, C, H, W) float, timesteps (B,) float on the 0..1000 scale, cond: Cond)
        -> (B, C_out, H, W), C_out = 2C with learn_sigma (eps first, then variance values).
    Submodule names follow facebookresearch/DiT so its checkpoints map key for key
    (see `convert.dit_from_original`).
    """

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
        conditioning: str = "adaln_zero",
        learn_sigma: bool = False,
        mlp_ratio: float = 4.0,
    ):
        super().__init__()
        _check_dit_args(image_size, patch_size, hidden_size, num_heads, conditioning)
        self.image_size = image_size
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.num_classes = num_classes
        self.learn_sigma = learn_sigma
        self.patch_size = patch_size
        self.conditioning = conditioning

        self.x_embedder = PatchEmbed(image_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        # Fixed, not learned (DiT): a frozen Parameter so it is saved and counted like DiT's.
        num_patches = self.x_embedder.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        block = BLOCKS[conditioning]
        self.blocks = nn.ModuleList(block(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's init, one rule per step (facebookresearch/DiT `initialize_weights`)."""

        # Transformer linears: xavier-uniform weights, zero biases (the ViT/MAE recipe).
        def basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

        self.apply(basic_init)
        # Fixed 2-D sin-cos positions.
        grid = self.x_embedder.grid_size
        table = sincos_pos_embed_2d(self.pos_embed.shape[-1], grid)  # (T, D)
        self.pos_embed.data.copy_(table.unsqueeze(0))
        # Patch conv initialised like a linear layer on the flattened patch (MAE).
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.data.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        # Embedding table and timestep MLP: normal(0, 0.02), as DiT.
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # Conditioning-specific zero init (adaLN-Zero), then the zero output layer.
        for block in self.blocks:
            block.zero_init()
        self.final_layer.zero_init()

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, cond: Cond) -> torch.Tensor:
        b = x.shape[0]
        h = self.x_embedder(x) + self.pos_embed  # (B, T, D)
        t = self.t_embedder(timesteps)  # (B, D)
        y = self.y_embedder(cond.labels, b)  # (B, D)
        c = t + y  # (B, D): the single conditioning vector of adaLN
        for block in self.blocks:
            h = block(h, c)  # (B, T, D)
        h = self.final_layer(h, c)  # (B, T, p*p*C_out)
        return unpatchify(h, self.patch_size, self.out_channels)  # (B, C_out, H, W)

    def num_params(self, trainable_only: bool = False) -> int:
        """Parameter count; the frozen position table counts unless trainable_only."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def flops(self, batch: int = 1) -> dict[str, int]:
        """Analytic forward cost: {"macs": multiply-adds (DiT's "Gflops"), "flops": 2 * macs}.

        Counted, per sample: every linear layer (per token in blocks and final layer; once per
        sample for the timestep MLP and the adaLN regressions), the patch-embedding conv, and
        the two attention matmuls Q K^T and attn @ V (2 T^2 D). Not counted: elementwise ops
        (LayerNorm, softmax, GELU/SiLU, modulate, residual adds), the label lookup and the
        sinusoid. With exactly these terms all 12 DiT configurations of [DiT] Table 4
        (32x32x4 latents, 1000 classes, learned sigma) agree within 0.02 G; dropping the
        adaLN regressions or the attention matmuls would miss XL/2 by 0.22 G / 4.2 G, so the
        paper counted both. The count equals torch's FlopCounterMode / 2 (its SDPA rules count
        the same two matmuls; torch 2.14 has no rule for the fused CPU kernel, so on CPU it
        only sees attention under `sdpa_kernel(SDPBackend.MATH)`).
        """
        tokens = self.x_embedder.num_patches
        macs = (
            self.x_embedder.macs()
            + self.t_embedder.macs()
            + self.y_embedder.macs()
            + sum(block.macs(tokens) for block in self.blocks)
            + self.final_layer.macs(tokens)
        )
        return {"macs": batch * macs, "flops": 2 * batch * macs}


def _check_dit_args(
    image_size: int, patch_size: int, hidden_size: int, num_heads: int, conditioning: str
) -> None:
    if conditioning not in BLOCKS:
        raise ValueError(
            f"conditioning={conditioning!r} is not implemented for DiT; allowed: {list(BLOCKS)}"
        )
    if image_size % patch_size:
        raise ValueError(f"patch_size={patch_size} must divide image_size={image_size}")
    if hidden_size % num_heads:
        raise ValueError(f"num_heads={num_heads} must divide hidden_size={hidden_size}")
    if hidden_size % 4:
        raise ValueError(f"hidden_size={hidden_size} must be a multiple of 4 (2-D sin-cos table)")


# ---------------------------------------------------------------------------------------------
# Builder (registered in dit_bench.backbones.BACKBONES)
# ---------------------------------------------------------------------------------------------


def build_dit(
    *,
    image_size: int,
    in_channels: int,
    num_classes: int,
    depth: int,
    hidden_size: int,
    num_heads: int,
    patch_size: int,
    conditioning: str = "adaln_zero",
    learn_sigma: bool = False,
) -> DiT:
    """Build a DiT from explicit sizes (presets are resolved in `dit_bench.backbones`)."""
    return DiT(
        image_size=image_size,
        in_channels=in_channels,
        num_classes=num_classes,
        depth=depth,
        hidden_size=hidden_size,
        num_heads=num_heads,
        patch_size=patch_size,
        conditioning=conditioning,
        learn_sigma=learn_sigma,
    )
