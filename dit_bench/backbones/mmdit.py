"""MMDiT: the multimodal diffusion transformer of Stable Diffusion 3 (Esser et al. 2024).

References
- [SD3] P. Esser et al., "Scaling Rectified Flow Transformers for High-Resolution Image
  Synthesis", ICML 2024, arXiv:2403.03206. Sec. 4 / Fig. 2: two token streams (image patches,
  text tokens) with their own weights, one joint attention over the concatenated sequence,
  adaLN-Zero-style modulation of both streams from timestep + pooled text vector; Sec. 5.3.2:
  QK-normalisation with RMSNorm; Sec. 5.3: model size set by depth d, width 64 d, d heads.
  Code: huggingface/diffusers `transformer_sd3.py`, `attention.py` (JointTransformerBlock with
  `context_pre_only` in the last block), `attention_processor.py` (JointAttnProcessor2_0:
  image tokens first, then context tokens).
- [DiT] W. Peebles, S. Xie, ICCV 2023: adaLN-Zero, final layer, init rules, patchify.
- [CFG] J. Ho, T. Salimans, 2022: the null class.

Class-conditional data has no text encoder, so a class label becomes `context_tokens` learned
context tokens and a learned pooled vector (table row `num_classes` is the null class). Text-style
conditioning passes `Cond.context` (B, L, context_dim) and `Cond.pooled` (B, pooled_dim) instead;
either one replaces the label-derived one.

The last block updates only the image stream (diffusers' `context_pre_only`): its context
tokens still give keys and values, but nothing reads their outputs, so that block has no
context query, output projection or MLP at all (diffusers keeps a dead `add_q_proj` there,
which `convert.mmdit_from_diffusers` drops).

Shapes: B batch, T = (H / p)^2 image tokens, S context tokens, D width, Hd heads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from dit_bench.backbones.family import Family
from dit_bench.backbones.layers import (
    FinalLayer,
    LabelEmbedder,
    Mlp,
    PatchEmbed,
    TimestepEmbedder,
    attention,
    modulate,
    sincos_pos_embed_2d,
    split_heads,
    unpatchify,
    vit_geometry_errors,
)

if TYPE_CHECKING:
    from dit_bench.backbones import Cond

CONDITIONINGS: tuple[str, ...] = ("joint_attn",)

# ---------------------------------------------------------------------------------------------
# Block
# ---------------------------------------------------------------------------------------------


class MMDiTBlock(nn.Module):
    """One MMDiT block [SD3 Fig. 2b]: per-stream adaLN-Zero, joint attention, per-stream MLP.

    For each stream s (image x, context c), with (shift, scale, gate) x 2 regressed from the
    conditioning vector y = t_emb + pooled_emb:
        q_s, k_s, v_s = split(W_qkv_s modulate(LN(s), shift1_s, scale1_s))   (QK-RMSNorm opt.)
        [o_x, o_c]    = softmax([q_x; q_c] [k_x; k_c]^T / sqrt(d)) [v_x; v_c]
        s = s + gate1_s * W_out_s o_s
        s = s + gate2_s * MLP_s(modulate(LN(s), shift2_s, scale2_s))
    With `context_pre_only` (the last block) the context only supplies keys and values and
    its modulation is (shift, scale) without gates.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qk_norm: bool = False,
        context_pre_only: bool = False,
    ):
        super().__init__()
        d = hidden_size
        self.num_heads = num_heads
        self.context_pre_only = context_pre_only
        self.qk_norm = qk_norm
        # Image stream.
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(d, mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        # Context stream: own weights, same shapes (keys and values only in the last block).
        self.context_norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        if context_pre_only:
            self.context_kv = nn.Linear(d, 2 * d)
            self.context_adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))
        else:
            self.context_qkv = nn.Linear(d, 3 * d)
            self.context_proj = nn.Linear(d, d)
            self.context_norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
            self.context_mlp = Mlp(d, mlp_ratio)
            self.context_adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        if qk_norm:  # per-head RMSNorm of queries and keys, learned gain [SD3 Sec. 5.3.2]
            head = d // num_heads
            self.q_norm = nn.RMSNorm(head, eps=1e-6)
            self.k_norm = nn.RMSNorm(head, eps=1e-6)
            self.context_k_norm = nn.RMSNorm(head, eps=1e-6)
            if not context_pre_only:
                self.context_q_norm = nn.RMSNorm(head, eps=1e-6)

    def forward(
        self, x: torch.Tensor, ctx: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, t, d = x.shape
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(
            y
        ).chunk(6, dim=1)  # 6 x (B, D)
        hd = self.num_heads
        x_in = modulate(self.norm1(x), shift_msa, scale_msa)  # (B, T, D)
        q, k, v = split_heads(self.qkv(x_in), 3, hd)  # (B, Hd, T, d_head) each
        if self.context_pre_only:
            c_shift, c_scale = self.context_adaLN_modulation(y).chunk(2, dim=1)  # 2 x (B, D)
            c_in = modulate(self.context_norm1(ctx), c_shift, c_scale)  # (B, S, D)
            ck, cv = split_heads(self.context_kv(c_in), 2, hd)  # (B, Hd, S, d_head) each
        else:
            c_mods = self.context_adaLN_modulation(y).chunk(6, dim=1)  # 6 x (B, D)
            c_in = modulate(self.context_norm1(ctx), c_mods[0], c_mods[1])  # (B, S, D)
            cq, ck, cv = split_heads(self.context_qkv(c_in), 3, hd)  # (B, Hd, S, d_head) each
        if self.qk_norm:
            q, k, ck = self.q_norm(q), self.k_norm(k), self.context_k_norm(ck)
            if not self.context_pre_only:
                cq = self.context_q_norm(cq)
        keys = torch.cat([k, ck], dim=2)  # (B, Hd, T + S, d_head): image tokens first
        values = torch.cat([v, cv], dim=2)  # (B, Hd, T + S, d_head)
        queries = q if self.context_pre_only else torch.cat([q, cq], dim=2)
        o = attention(queries, keys, values)  # (B, Hd, T [+ S], d_head)
        o = o.transpose(1, 2).reshape(b, -1, d)  # (B, T [+ S], D)

        x = x + gate_msa.unsqueeze(1) * self.proj(o[:, :t])  # (B, T, D)
        h = self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # (B, T, D)
        x = x + gate_mlp.unsqueeze(1) * h  # (B, T, D)
        if self.context_pre_only:
            return x, None
        _, _, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = c_mods
        ctx = ctx + c_gate_msa.unsqueeze(1) * self.context_proj(o[:, t:])  # (B, S, D)
        h = modulate(self.context_norm2(ctx), c_shift_mlp, c_scale_mlp)  # (B, S, D)
        h = self.context_mlp(h)  # (B, S, D)
        return x, ctx + c_gate_mlp.unsqueeze(1) * h  # (B, T, D), (B, S, D)

    def zero_init(self) -> None:
        # adaLN-Zero for both streams: every residual branch vanishes at init [DiT Sec. 3.2].
        for mod in (self.adaLN_modulation, self.context_adaLN_modulation):
            nn.init.zeros_(mod[-1].weight)
            nn.init.zeros_(mod[-1].bias)

    def macs(self, tokens: int, context: int) -> int:
        d = self.proj.in_features
        t, s = tokens, context
        image = t * d * 4 * d + self.mlp.macs(t) + d * 6 * d  # qkv + out, MLP, modulation
        if self.context_pre_only:
            ctx = s * d * 2 * d + d * 2 * d  # kv, modulation
            attn = 2 * t * (t + s) * d  # only image queries
        else:
            ctx = s * d * 4 * d + self.context_mlp.macs(s) + d * 6 * d
            attn = 2 * (t + s) * (t + s) * d
        return image + ctx + attn


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


class MMDiT(nn.Module):
    """SD3-style MMDiT over a square image or latent.

    forward(x (B, C, H, W), timesteps (B,) on the 0..1000 scale, cond: Cond) -> (B, C_out, H, W).
    cond.labels -> learned context tokens and pooled vector (null class when None); cond.context
    (B, S, context_dim) and cond.pooled (B, pooled_dim), when given, replace them.
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
        conditioning: str = "joint_attn",
        learn_sigma: bool = False,
        qk_norm: bool = False,
        context_tokens: int = 4,
        context_dim: int | None = None,
        pooled_dim: int | None = None,
        mlp_ratio: float = 4.0,
    ):
        super().__init__()
        if conditioning not in CONDITIONINGS:
            raise ValueError(f"conditioning={conditioning!r} for MMDiT; allowed: {CONDITIONINGS}")
        spec = dict(patch_size=patch_size, hidden_size=hidden_size, num_heads=num_heads)
        errors = vit_geometry_errors(spec, image_size)  # patches, heads, the sin-cos table
        if errors:
            raise ValueError("; ".join(errors))
        self.image_size = image_size
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.num_classes = num_classes
        self.learn_sigma = learn_sigma
        self.conditioning = conditioning
        self.patch_size = patch_size
        self.context_tokens = context_tokens
        self.context_dim = context_dim or hidden_size
        self.pooled_dim = pooled_dim or hidden_size
        d = hidden_size

        self.x_embedder = PatchEmbed(image_size, patch_size, in_channels, d)
        num_patches = self.x_embedder.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, d), requires_grad=False)
        self.t_embedder = TimestepEmbedder(d)
        # SD3's pooled-text MLP and context projection ("y" and "context" embedders).
        self.pooled_embedder = nn.Sequential(
            nn.Linear(self.pooled_dim, d), nn.SiLU(), nn.Linear(d, d)
        )
        self.context_embedder = nn.Linear(self.context_dim, d)
        # Class label -> context tokens and pooled vector, each with the null row [CFG].
        self.y_context = LabelEmbedder(num_classes, context_tokens * self.context_dim)
        self.y_pooled = LabelEmbedder(num_classes, self.pooled_dim)
        self.blocks = nn.ModuleList(
            MMDiTBlock(d, num_heads, mlp_ratio, qk_norm, context_pre_only=i == depth - 1)
            for i in range(depth)
        )
        self.final_layer = FinalLayer(d, patch_size, self.out_channels, adaptive=True)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's init rules [DiT `initialize_weights`], applied to both streams."""

        def basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

        self.apply(basic_init)
        table = sincos_pos_embed_2d(self.pos_embed.shape[-1], self.x_embedder.grid_size)
        self.pos_embed.data.copy_(table.unsqueeze(0))
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.data.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        for table in (self.y_context, self.y_pooled):
            nn.init.normal_(table.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            block.zero_init()
        self.final_layer.zero_init()

    @property
    def num_tokens(self) -> int:
        """Joint sequence length with the label-derived context: T + context_tokens."""
        return self.x_embedder.num_patches + self.context_tokens

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, cond: Cond) -> torch.Tensor:
        b = x.shape[0]
        h = self.x_embedder(x) + self.pos_embed  # (B, T, D)
        context = cond.context
        if context is None:  # (B, S, context_dim) from the label
            context = self.y_context(cond.labels, b).reshape(b, self.context_tokens, -1)
        # pooled: (B, pooled_dim), the caller's vector, else the label's
        pooled = cond.pooled if cond.pooled is not None else self.y_pooled(cond.labels, b)
        y = self.t_embedder(timesteps) + self.pooled_embedder(pooled)  # (B, D)
        ctx = self.context_embedder(context)  # (B, S, D)
        for block in self.blocks:
            h, ctx = block(h, ctx, y)  # (B, T, D), (B, S, D) (None after the last block)
        h = self.final_layer(h, y)  # (B, T, p*p*C_out)
        return unpatchify(h, self.patch_size, self.out_channels)  # (B, C_out, H, W)

    def num_params(self, trainable_only: bool = False) -> int:
        """Parameter count; the frozen position table counts unless trainable_only."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def flops(self, batch: int = 1, context_tokens: int | None = None) -> dict[str, int]:
        """Analytic forward cost {"macs", "flops" = 2 macs}, with `context_tokens` context tokens
        (default: the label-derived ones). Counted as DiT's `flops`: linear layers (per token in
        the streams and final layer, once per sample for the t / pooled MLPs and modulations),
        the patch conv, the context projection and the two joint-attention matmuls."""
        s = self.context_tokens if context_tokens is None else context_tokens
        t = self.x_embedder.num_patches
        d = self.final_layer.linear.in_features
        pooled = self.pooled_dim * d + d * d
        macs = (
            self.x_embedder.macs()
            + self.t_embedder.macs()
            + pooled
            + s * self.context_dim * d
            + sum(block.macs(t, s) for block in self.blocks)
            + self.final_layer.macs(t)
        )
        return {"macs": batch * macs, "flops": 2 * batch * macs}


# ---------------------------------------------------------------------------------------------
# Presets: SD3 Sec. 5.3 parametrises size by depth d: width 64 d, d heads (head size 64)
# ---------------------------------------------------------------------------------------------

PRESETS: dict[str, dict] = {
    f"mmdit-d{depth}/{patch}": dict(
        family="mmdit",
        depth=depth,
        hidden_size=64 * depth,
        num_heads=depth,
        patch_size=patch,
        qk_norm=False,
    )
    for depth in (2, 4, 6, 8, 12, 16, 24, 38)  # d2-d6: CPU; d24 ~ SD3-medium; d38: SD3 8B
    for patch in (2, 4)
}

FAMILY = Family("mmdit", MMDiT, CONDITIONINGS, PRESETS, vit_geometry_errors)
