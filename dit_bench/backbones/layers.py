"""Shared backbone primitives: the few pieces every transformer backbone here reuses.

Embedders, attention, MLP, the final layer, the patch-transformer geometry check and the check
that refuses conditioning a backbone does not read. Families import from here, never from each
other, so a change to one family cannot silently change another.

References
- [DiT] W. Peebles, S. Xie, "Scalable Diffusion Models with Transformers", ICCV 2023,
  arXiv:2212.09748; code: facebookresearch/DiT `models.py` (modulate, TimestepEmbedder,
  LabelEmbedder, get_2d_sincos_pos_embed). Section 3.2 (adaLN), Appendix (embedders).
- [ViT] A. Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021: patch embedding as a
  strided convolution.
- [MAE] K. He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022: the 2-D
  sin-cos position table (`get_2d_sincos_pos_embed`) that DiT copies.
- [Transformer] A. Vaswani et al., "Attention Is All You Need", NeurIPS 2017: sinusoidal
  embedding (Sec. 3.5) and scaled dot-product attention, Eq. (1): softmax(Q K^T / sqrt(d)) V.
- [CFG] J. Ho, T. Salimans, "Classifier-Free Diffusion Guidance", 2022: the null class.
- [GELU] D. Hendrycks, K. Gimpel, "Gaussian Error Linear Units (GELUs)", arXiv:1606.08415:
  the tanh approximation (Sec. 2) that DiT's MLP uses.

Every module here also reports its forward multiply-accumulates analytically (`macs`), so a
backbone's `flops()` is the sum of its parts. Convention (shared by the whole package): one
multiply-add = 1 MAC, counting matrix products only (linear layers, convolutions, the two
attention matmuls); elementwise work (norms, activations, softmax, modulation, residual adds)
and table lookups are not counted.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:  # Cond lives in the package __init__, which imports the families
    from dit_bench.backbones import Cond

# ---------------------------------------------------------------------------------------------
# Functional helpers
# ---------------------------------------------------------------------------------------------


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Adaptive-norm modulation x * (1 + scale) + shift, per sample, broadcast over tokens.

    `1 + scale` (not `scale`) so a zero-initialised modulation leaves x unchanged [DiT Sec. 3.2].
    x: (B, T, D); shift, scale: (B, D).
    """
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)  # (B, T, D)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, DiT's layout: [cos | sin].

    freq_i = max_period ** (-i / half), i = 0..half-1; out = [cos(t * freq), sin(t * freq)]
    [Transformer Sec. 3.5; DiT `TimestepEmbedder.timestep_embedding`]. Computed in at least
    float32 because t runs up to 1000: in bf16/fp16 the phase t * freq would be mostly rounding.
    t: (B,) -> (B, dim).
    """
    work = torch.float64 if t.dtype == torch.float64 else torch.float32
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=work, device=t.device) / half
    )  # (half,)
    args = t.to(work)[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2 * half)
    if dim % 2:  # odd width: pad one zero column, as DiT does (dim 1: emb has no column)
        emb = torch.cat([emb, emb.new_zeros(emb.shape[0], 1)], dim=-1)  # (B, dim)
    return emb


def sincos_pos_embed_2d(dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position table for a square grid of patches, token order row-major.

    Exactly MAE's / DiT's `get_2d_sincos_pos_embed`: the first dim/2 channels encode the column
    (x) coordinate, the last dim/2 the row (y) coordinate (DiT builds `meshgrid(w, h)` and its
    "emb_h" half therefore holds x); each half is [sin | cos] with omega_k = 10000 ** (-k / (dim/4)).
    Computed in float64 as the numpy original, returned as float32. -> (grid_size**2, dim).
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos positions need a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (D/4,)
    coords = torch.arange(grid_size, dtype=torch.float64)  # (G,)
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")  # (G, G) each, row-major tokens

    def one_axis(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1, 1) * omega[None]  # (G*G, D/4)
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)  # (G*G, D/2)

    return torch.cat([one_axis(xs), one_axis(ys)], dim=1).float()  # (G*G, D)


def unpatchify(x: torch.Tensor, patch_size: int, channels: int) -> torch.Tensor:
    """Inverse of patch embedding's token layout: (B, T, p*p*C) -> (B, C, H, W), square grid.

    Channel order inside a token is (p_row, p_col, C), as DiT's `unpatchify`.
    """
    b, t, _ = x.shape
    g = math.isqrt(t)
    p = patch_size
    x = x.reshape(b, g, g, p, p, channels)  # (B, h, w, p, q, C)
    x = torch.einsum("nhwpqc->nchpwq", x)  # (B, C, h, p, w, q)
    return x.reshape(b, channels, g * p, g * p)  # (B, C, H, W)


# ---------------------------------------------------------------------------------------------
# Embedders
# ---------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> tokens, as a Conv2d with kernel = stride = p [ViT].

    Named `proj` like timm's PatchEmbed so DiT checkpoints map key for key.
    """

    def __init__(self, image_size: int, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.image_size = image_size
        self.patch_size = patch_size
        self.grid_size = image_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Only image_size x image_size: the position table has exactly grid^2 rows and
        # unpatchify assumes that square grid, so a 4x16 input (same token count) or a 9x9 one
        # (the conv drops the odd pixel) would otherwise run and come back 8x8. A static shape
        # check: no device sync, and torch.compile turns it into a guard.
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(
                f"input is {x.shape[-2]}x{x.shape[-1]} (H x W), but this model was built for "
                f"{self.image_size}x{self.image_size} (image_size={self.image_size}, "
                f"patch {self.patch_size})"
            )
        x = self.proj(x)  # (B, D, H/p, W/p)
        # Contiguous, not the transposed view: elementwise ops keep their first operand's
        # layout, so `tokens + pos_embed` and every residual add after it would carry the
        # stream token-minor through all blocks, each LayerNorm and linear then copying or
        # transposing it (2-6% of the DiT-S/2 CPU step, eager and compiled alike:
        # reports/bench-cpu/ab_token_layout.py).
        return x.flatten(2).transpose(1, 2).contiguous()  # (B, T, D), tokens row-major

    def macs(self) -> int:
        c_in, k = self.proj.in_channels, self.patch_size
        return self.num_patches * (c_in * k * k) * self.proj.out_channels


class TimestepEmbedder(nn.Module):
    """Scalar timestep -> vector: 256 sinusoidal frequencies, then Linear-SiLU-Linear [DiT]."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = timestep_embedding(t, self.frequency_embedding_size)  # (B, 256)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))  # (B, D)

    def macs(self) -> int:
        d = self.mlp[2].out_features
        return self.frequency_embedding_size * d + d * d


class LabelEmbedder(nn.Module):
    """Class label -> vector. The table always has num_classes + 1 rows: row num_classes is the
    null class of classifier-free guidance [CFG].

    Unlike DiT's LabelEmbedder there is no label dropout in here: the training module replaces
    labels by the null class, so the backbone stays a deterministic function of its inputs.
    """

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, labels: torch.Tensor | None, batch: int) -> torch.Tensor:
        if labels is None:  # unconditional call: every sample gets the null class
            labels = torch.full(
                (batch,),
                self.num_classes,
                dtype=torch.long,
                device=self.embedding_table.weight.device,
            )
        return self.embedding_table(labels)  # (B, D)

    def macs(self) -> int:
        return 0  # a table lookup, no multiply-adds


# ---------------------------------------------------------------------------------------------
# Transformer pieces
# ---------------------------------------------------------------------------------------------


# Longest query / key sequence for which compiled CPU code attends by `ShortAttention`.
SHORT_ATTENTION_TOKENS = 128


def _compiling_for_cpu(x: torch.Tensor) -> bool:
    """Whether torch.compile is tracing this code for the CPU: where `attention` and
    `TanhGELU` take their rewrites (the GPU and eager code keep the ATen kernels)."""
    return torch.compiler.is_compiling() and x.device.type == "cpu"


class ShortAttention(torch.autograd.Function):
    """softmax(Q K^T / sqrt(d)) V [Transformer Eq. 1] by batched matrix products, keeping the
    probabilities P for the backward:
        dV = P^T dO,  dP = dO V^T,  dS = P * (dP - rowsum(dP * P)),  dQ = dS K / sqrt(d),
        dK = dS^T Q / sqrt(d).
    For short sequences P is small (B H T S floats) and keeping it beats the flash kernel's
    recomputation and tiling; for long ones the flash kernel wins (see `attention`).
    q: (B, H, T, d); k, v: (B, H, S, d).
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, h, t, d = q.shape
        s = k.shape[2]
        q3, k3, v3 = q.reshape(b * h, t, d), k.reshape(b * h, s, d), v.reshape(b * h, s, d)
        scale = d**-0.5
        p = torch.softmax(torch.bmm(q3 * scale, k3.transpose(1, 2)), dim=-1)  # (BH, T, S)
        ctx.save_for_backward(q3, k3, v3, p)
        return torch.bmm(p, v3).view(b, h, t, d)  # (B, H, T, d)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
        q3, k3, v3, p = ctx.saved_tensors
        b, h, t, d = grad.shape
        s = k3.shape[1]
        scale = d**-0.5
        do = grad.reshape(b * h, t, d)
        dv = torch.bmm(p.transpose(1, 2), do)  # (BH, S, d)
        dp = torch.bmm(do, v3.transpose(1, 2))  # (BH, T, S)
        ds = p * (dp - (dp * p).sum(-1, keepdim=True))  # softmax backward
        dq = torch.bmm(ds, k3) * scale  # (BH, T, d)
        dk = torch.bmm(ds.transpose(1, 2), q3) * scale  # (BH, S, d)
        return dq.view(b, h, t, d), dk.view(b, h, s, d), dv.view(b, h, s, d)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Scaled dot-product attention, (B, H, T, d) queries, (B, H, S, d) keys/values.

    `F.scaled_dot_product_attention` (flash / memory-efficient kernels on GPU, flash on CPU),
    except in float32 code compiled for the CPU with both sequences at most
    SHORT_ATTENTION_TOKENS long: there `ShortAttention`. Measured on a 2-core CPU: the compiled
    DiT-S/2 training step (64 tokens, 6 heads of 64, batch 32) takes 940 ms with it against
    964 ms (reports/bench-cpu/ab_cpu_rewrites.py); compiled attention alone, forward +
    backward, gains 10% at 128 tokens, nothing at 256, and at 1024 the flash kernel is twice
    as fast. Equal up to float rounding (tests/test_fast_paths.py).
    """
    short = max(q.shape[-2], k.shape[-2]) <= SHORT_ATTENTION_TOKENS
    # float32 only: under bf16 autocast the fused kernel stays
    if _compiling_for_cpu(q) and short and q.dtype == torch.float32:
        return ShortAttention.apply(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


def split_heads(x: torch.Tensor, n: int, num_heads: int) -> tuple[torch.Tensor, ...]:
    """A fused projection (B, S, n * D) -> n tensors (B, H, S, d_head), views of it.

    The n chunks are unbound before the heads move forward. Same views as
    `permute(2, 0, 3, 1, 4).unbind(0)`, but a different backward: this one stacks the n
    gradients straight into the projection's (B, S, n, H, d_head) layout in one pass, where the
    permute form makes Inductor stack them and then copy the stack into that layout. Compiled
    DiT-S/2 training step on the 2-core CPU: 992.6 -> 971.6 ms (medians of 21, interleaved;
    two more A/Bs: 1014 -> 1005, 1033 -> 1015; reports/bench-cpu/ab_split_heads.py), the
    stacking kernel 17.7 -> 11.0 ms a step.
    """
    b, s, _ = x.shape
    x = x.reshape(b, s, n, num_heads, -1)  # (B, S, n, H, d_head)
    return tuple(z.transpose(1, 2) for z in x.unbind(2))  # n x (B, H, S, d_head)


class Attention(nn.Module):
    """Multi-head self-attention, fused qkv projection with bias, output projection.

    softmax(Q K^T / sqrt(d_head)) V [Transformer Eq. 1] through `attention`, which picks the
    fastest exact kernel. Submodule names `qkv` and `proj` follow timm's Attention, which DiT
    uses.
    """

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide hidden_size={hidden_size}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.num_heads
        q, k, v = split_heads(self.qkv(x), 3, h)  # each (B, H, T, d_head)
        x = attention(q, k, v)  # (B, H, T, d_head)
        x = x.transpose(1, 2).reshape(b, t, d)  # (B, T, D)
        return self.proj(x)  # (B, T, D)

    def macs(self, tokens: int) -> int:
        d = self.proj.in_features
        projections = tokens * d * 3 * d + tokens * d * d  # qkv and output projection
        matmuls = 2 * tokens * tokens * d  # Q K^T and attn @ V, summed over heads
        return projections + matmuls


_GELU_A = 0.044715
_GELU_2C = 2.0 * math.sqrt(2.0 / math.pi)


class GELUTanhAsSigmoid(torch.autograd.Function):
    """GELU's tanh approximation as x * s, s = sigmoid(2u), u = sqrt(2/pi)(x + 0.044715 x^3).

    The same function as `F.gelu(x, approximate="tanh")`, since 0.5 (1 + tanh(u)) = sigmoid(2u),
    with the backward written out, d/dx = s + x s (1 - s) 2u'(x), from the s the forward
    keeps: the backward needs no exp. Left to derive its own backward, torch.compile saves x
    and recomputes the sigmoid there.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        s = torch.sigmoid(_GELU_2C * (x + _GELU_A * x * x * x))
        ctx.save_for_backward(x, s)
        return x * s

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        x, s = ctx.saved_tensors
        return grad * (s + x * s * (1 - s) * (_GELU_2C * (1 + 3 * _GELU_A * x * x)))


class TanhGELU(nn.Module):
    """GELU, tanh approximation [GELU Sec. 2]: 0.5 x (1 + tanh(u)), u = c (x + 0.044715 x^3),
    c = sqrt(2 / pi).

    Compiled for the CPU it runs as `GELUTanhAsSigmoid`: one exp instead of a tanh (Inductor's
    vectorised CPU tanh is slow), none in the backward. Eager keeps `F.gelu` (one ATen kernel,
    where the sigmoid form would run several), and so does the GPU, where both forms are
    memory-bound. Equal up to float rounding (tests/test_fast_paths.py). Measured
    (reports/bench-cpu/ab_cpu_rewrites.py): the compiled DiT-S/2 training step (16x16x4,
    batch 32, float32, 2-core CPU) takes 964 ms this way against 1051 ms with `F.gelu`.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _compiling_for_cpu(x):
            return GELUTanhAsSigmoid.apply(x)
        return F.gelu(x, approximate="tanh")


class Mlp(nn.Module):
    """Token-wise MLP fc1 -> GELU -> fc2, the ViT/DiT block MLP (names as timm's Mlp).

    `approximate` as F.gelu's: "tanh" for DiT and SD3 (both use the tanh approximation), "none"
    for the exact erf GELU (nn.GELU, timm's default, which U-ViT keeps). The CPU rewrite of
    `TanhGELU` concerns the tanh form only; the exact one is always F.gelu.
    """

    def __init__(self, hidden_size: int, mlp_ratio: float = 4.0, approximate: str = "tanh"):
        super().__init__()
        if approximate not in ("tanh", "none"):
            raise ValueError(f"approximate must be 'tanh' or 'none', got {approximate!r}")
        inner = int(hidden_size * mlp_ratio)
        self.fc1 = nn.Linear(hidden_size, inner)
        self.act = TanhGELU() if approximate == "tanh" else nn.GELU()
        self.fc2 = nn.Linear(inner, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))  # (B, T, D)

    def macs(self, tokens: int) -> int:
        return tokens * 2 * self.fc1.in_features * self.fc1.out_features


# ---------------------------------------------------------------------------------------------
# Output layer
# ---------------------------------------------------------------------------------------------


class FinalLayer(nn.Module):
    """LayerNorm then a linear map from each token to its p*p*C_out pixels [DiT Sec. 3.2].

    "We apply the final layer norm (adaptive if using adaLN) and linearly decode each token":
    with `adaptive` the norm has no affine parameters and is modulated by c (DiT's adaln_zero and
    adaln, MMDiT); without it (DiT's cross_attn and in_context, whose blocks never see a
    conditioning vector) it is an ordinary affine LayerNorm, the end of a standard ViT.
    """

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, adaptive: bool = True):
        super().__init__()
        self.adaptive = adaptive
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=not adaptive, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        if adaptive:
            self.adaLN_modulation = nn.Sequential(
                nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size)
            )

    def forward(self, x: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        x = self.norm_final(x)  # (B, T, D)
        if self.adaptive:
            shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # 2 x (B, D)
            x = modulate(x, shift, scale)  # (B, T, D)
        return self.linear(x)  # (B, T, p*p*C_out)

    def zero_init(self, modulation: bool = True) -> None:
        # Zero output layer, for every scheme as DiT's `initialize_weights`: the network
        # predicts exactly 0 at init. The final modulation is zeroed only for adaLN-Zero.
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        if self.adaptive and modulation:
            nn.init.zeros_(self.adaLN_modulation[-1].weight)
            nn.init.zeros_(self.adaLN_modulation[-1].bias)

    def macs(self, tokens: int) -> int:
        d = self.linear.in_features
        return tokens * d * self.linear.out_features + (2 * d * d if self.adaptive else 0)


# ---------------------------------------------------------------------------------------------
# Checks shared by the families
# ---------------------------------------------------------------------------------------------


def vit_geometry_errors(
    spec: dict, image_size: int, prefix: str = "", *, sincos_table: bool = True
) -> list[str]:
    """Why a patch transformer `spec` cannot run on image_size x image_size inputs ([]: it can).

    Checks patch_size | image_size and num_heads | hidden_size; with `sincos_table` (the fixed
    2-D sin-cos positions of DiT and MMDiT) also 4 | hidden_size. U-ViT learns its positions
    and passes sincos_table=False. `prefix` goes before each key ("backbone." in config
    errors), so the message names the key.
    """
    errors = []
    p, width, heads = spec["patch_size"], spec["hidden_size"], spec["num_heads"]
    if image_size % p:
        allowed = [q for q in range(1, image_size + 1) if image_size % q == 0]
        errors.append(
            f"{prefix}patch_size={p} must divide the image size {image_size}; "
            f"allowed patch sizes: {allowed}"
        )
    if width % heads:
        allowed = [h for h in range(1, width + 1) if width % h == 0]
        errors.append(
            f"{prefix}num_heads={heads} must divide {prefix}hidden_size={width}; allowed: {allowed}"
        )
    elif sincos_table and width % 4:
        errors.append(f"{prefix}hidden_size={width} must be a multiple of 4 (2-D sin-cos table)")
    return errors


def refuse_unread_context(cond: Cond, backbone: str, reads: str) -> None:
    """Raise ValueError if `cond` carries `context` or `pooled`, which `backbone` never reads.

    Without this a caller passing text tokens to a label-only backbone would silently train a
    label-only model. `reads` says what the backbone does condition on. Only `is None` tests:
    no tensor is read, so there is no device sync and torch.compile traces no branch on data.
    """
    if cond.context is None and cond.pooled is None:
        return
    given = " and ".join(
        name
        for name, v in (("cond.context", cond.context), ("cond.pooled", cond.pooled))
        if v is not None
    )
    raise ValueError(
        f"{backbone} conditions on {reads} only and would ignore the {given} it was given; "
        "text-style conditioning (context tokens, pooled vector) needs an MMDiT backbone "
        "(joint_attn), or pass labels only"
    )
