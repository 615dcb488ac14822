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

Layout: blocks (one class per conditioning scheme) -> model -> geometry check -> presets. The
final layer is `layers.FinalLayer` (shared with MMDiT); `build_backbone` in the package __init__
builds a preset.
The conditioning scheme is one string (`conditioning=`) that selects the block class from
`BLOCKS`; each block class says how the conditioning enters (`condition`), how many extra tokens
it adds and whether the final LayerNorm is adaptive. The four schemes of [DiT] Sec. 3.2, Fig. 3:
- adaln_zero: scale/shift/gate regressed from t + y, the regression zero-initialised;
- adaln:      scale/shift regressed from t + y, no gates, ordinary (xavier) init;
- cross_attn: [t, y] as a length-2 sequence; a cross-attention layer after self-attention
              (to those two tokens only: `Cond.context` is refused, not attended to);
- in_context: t and y as two extra tokens of a plain ViT; removed before the final layer.

Shapes: B batch, C channels, H = W image side, p patch, G = H / p, T = G * G tokens, D width.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from dit_bench.backbones.family import Family
from dit_bench.backbones.layers import (
    Attention,
    FinalLayer,
    LabelEmbedder,
    Mlp,
    PatchEmbed,
    TimestepEmbedder,
    attention,
    modulate,
    refuse_unread_context,
    sincos_pos_embed_2d,
    split_heads,
    unpatchify,
    vit_geometry_errors,
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

    extra_tokens = 0  # tokens the scheme adds to the sequence
    adaptive_final = True  # final LayerNorm modulated by c as well

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        # No affine parameters: scale and shift come from the conditioning instead.
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    @staticmethod
    def condition(h: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> tuple:
        """(tokens, t_emb, y_emb) -> (tokens, what every block receives): c = t + y, (B, D)."""
        return h, t + y

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


class AdaLNBlock(nn.Module):
    """DiT block with plain adaLN [DiT Sec. 3.2 "Adaptive layer norm (adaLN) block"].

    Per-sample (shift, scale) for each LayerNorm regressed from c = t_emb + y_emb, no gates:
        x = x + Attn(modulate(LN(x), shift_msa, scale_msa))
        x = x + MLP(modulate(LN(x), shift_mlp, scale_mlp))
    The regression keeps the ordinary xavier init: zero-initialising it is what adaLN-Zero adds.
    """

    extra_tokens = 0
    adaptive_final = True  # "the final layer norm (adaptive if using adaLN)" [DiT Sec. 3.2]

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 4 * hidden_size))

    @staticmethod
    def condition(h: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> tuple:
        return h, t + y  # c = t + y, (B, D)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, shift_mlp, scale_mlp = self.adaLN_modulation(c).chunk(4, dim=1)
        x = x + self.attn(modulate(self.norm1(x), shift_msa, scale_msa))  # (B, T, D)
        return x + self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # (B, T, D)

    def zero_init(self) -> None:
        pass  # no zero init: that is the difference from adaLN-Zero

    def macs(self, tokens: int) -> int:
        d = self.adaLN_modulation[-1].in_features
        return self.attn.macs(tokens) + self.mlp.macs(tokens) + d * 4 * d


class CrossAttention(nn.Module):
    """Multi-head attention of image tokens (queries) to a conditioning sequence (keys, values).

    softmax(Q K^T / sqrt(d_head)) V with Q = x W_q, [K V] = ctx W_kv [Transformer Eq. 1].
    """

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(hidden_size, hidden_size)
        self.kv = nn.Linear(hidden_size, 2 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.num_heads
        q = self.q(x).reshape(b, t, h, d // h).transpose(1, 2)  # (B, H, T, d_head)
        k, v = split_heads(self.kv(ctx), 2, h)  # each (B, H, S, d_head)
        x = attention(q, k, v)  # (B, H, T, d_head)
        return self.proj(x.transpose(1, 2).reshape(b, t, d))  # (B, T, D)

    def macs(self, tokens: int, context: int) -> int:
        d = self.proj.in_features
        projections = tokens * d * d + context * d * 2 * d + tokens * d * d  # q, kv, out
        return projections + 2 * tokens * context * d  # Q K^T and attn @ V


class CrossAttnBlock(nn.Module):
    """DiT block with cross-attention [DiT Sec. 3.2 "Cross-attention block"].

    The embeddings of t and y form a length-2 sequence separate from the image tokens; a
    multi-head cross-attention layer follows self-attention (as the original Transformer
    decoder). Standard pre-LN ViT blocks otherwise, so LayerNorms keep their affine parameters:
        x = x + Attn(LN(x)); x = x + CrossAttn(LN(x), [t, y]); x = x + MLP(LN(x))
    The paper reports the largest overhead of the four, roughly 15% more Gflops (2 T D^2 extra
    per block for the query and output projections).
    """

    extra_tokens = 0
    adaptive_final = False  # no adaLN anywhere: the final LayerNorm is a plain one

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm_cross = nn.LayerNorm(hidden_size, eps=1e-6)
        self.cross_attn = CrossAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.mlp = Mlp(hidden_size, mlp_ratio)

    @staticmethod
    def condition(h: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> tuple:
        return h, torch.stack([t, y], dim=1)  # c = [t, y]: (B, 2, D)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))  # (B, T, D)
        x = x + self.cross_attn(self.norm_cross(x), c)  # (B, T, D)
        return x + self.mlp(self.norm2(x))  # (B, T, D)

    def zero_init(self) -> None:
        pass

    def macs(self, tokens: int) -> int:
        return self.attn.macs(tokens) + self.cross_attn.macs(tokens, 2) + self.mlp.macs(tokens)


class InContextBlock(nn.Module):
    """DiT block for in-context conditioning [DiT Sec. 3.2 "In-context conditioning"].

    t and y are two extra tokens of the sequence, treated like image tokens, so the block is a
    plain pre-LN ViT block: x = x + Attn(LN(x)); x = x + MLP(LN(x)). The model removes the two
    tokens after the last block.
    """

    extra_tokens = 2
    adaptive_final = False

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.mlp = Mlp(hidden_size, mlp_ratio)

    @staticmethod
    def condition(h: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> tuple:
        # [t, y, patches]: (B, 2 + T, D); no conditioning vector left for the blocks.
        return torch.cat([t[:, None], y[:, None], h], dim=1), None

    def forward(self, x: torch.Tensor, c: None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))  # (B, 2 + T, D)
        return x + self.mlp(self.norm2(x))  # (B, 2 + T, D)

    def zero_init(self) -> None:
        pass

    def macs(self, tokens: int) -> int:
        return self.attn.macs(tokens) + self.mlp.macs(tokens)


# conditioning name -> block class. The registry in `dit_bench.backbones` reads its keys.
BLOCKS: dict[str, type[nn.Module]] = {
    "adaln_zero": AdaLNZeroBlock,
    "adaln": AdaLNBlock,
    "cross_attn": CrossAttnBlock,
    "in_context": InContextBlock,
}
CONDITIONINGS: tuple[str, ...] = tuple(BLOCKS)


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
        self.block_class = block
        self.blocks = nn.ModuleList(block(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(
            hidden_size, patch_size, self.out_channels, adaptive=block.adaptive_final
        )
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
        self.final_layer.zero_init(modulation=conditioning_zero_init(self.conditioning))

    @property
    def num_tokens(self) -> int:
        """Sequence length the blocks see: patches plus the scheme's extra tokens."""
        return self.x_embedder.num_patches + self.block_class.extra_tokens

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, cond: Cond) -> torch.Tensor:
        refuse_unread_context(cond, f"DiT ({self.conditioning})", "the timestep and cond.labels")
        b = x.shape[0]
        h = self.x_embedder(x) + self.pos_embed  # (B, T, D)
        t = self.t_embedder(timesteps)  # (B, D)
        y = self.y_embedder(cond.labels, b)  # (B, D)
        # The scheme decides how (t, y) enter: c = t + y (adaLN), c = [t, y] (cross-attention),
        # or two extra tokens in h (in-context, c = None).
        h, c = self.block_class.condition(h, t, y)  # (B, T + extra, D), c
        for block in self.blocks:
            h = block(h, c)  # (B, T + extra, D)
        h = h[:, self.block_class.extra_tokens :]  # (B, T, D): conditioning tokens removed
        fin_c = c if self.final_layer.adaptive else None
        h = self.final_layer(h, fin_c)  # (B, T, p*p*C_out)
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
        patches = self.x_embedder.num_patches
        macs = (
            self.x_embedder.macs()
            + self.t_embedder.macs()
            + self.y_embedder.macs()
            + sum(block.macs(self.num_tokens) for block in self.blocks)
            + self.final_layer.macs(patches)  # conditioning tokens are gone by then
        )
        return {"macs": batch * macs, "flops": 2 * batch * macs}


def conditioning_zero_init(conditioning: str) -> bool:
    """Whether the scheme zero-initialises its modulation (only adaLN-Zero does)."""
    return conditioning == "adaln_zero"


def _check_dit_args(
    image_size: int, patch_size: int, hidden_size: int, num_heads: int, conditioning: str
) -> None:
    if conditioning not in BLOCKS:
        raise ValueError(
            f"conditioning={conditioning!r} is not implemented for DiT; allowed: {list(BLOCKS)}"
        )
    spec = dict(patch_size=patch_size, hidden_size=hidden_size, num_heads=num_heads)
    errors = vit_geometry_errors(spec, image_size)  # patches, heads, the sin-cos table
    if errors:
        raise ValueError("; ".join(errors))


# ---------------------------------------------------------------------------------------------
# Presets: DiT Table 1 sizes x patch sizes, plus small CPU sizes that train in minutes
# ---------------------------------------------------------------------------------------------

_SIZES = {  # name: (depth, hidden_size, num_heads)
    "xs": (4, 128, 4),  # CPU: minutes on 2 cores
    "ti": (6, 192, 3),  # CPU: DeiT-Ti width
    "s": (12, 384, 6),  # DiT Table 1
    "b": (12, 768, 12),
    "l": (24, 1024, 16),
    "xl": (28, 1152, 16),
}
PRESETS: dict[str, dict] = {
    f"dit-{size}/{patch}": dict(
        family="dit", depth=depth, hidden_size=width, num_heads=heads, patch_size=patch
    )
    for size, (depth, width, heads) in _SIZES.items()
    for patch in (2, 4, 8)
}

FAMILY = Family("dit", DiT, CONDITIONINGS, PRESETS, vit_geometry_errors)
