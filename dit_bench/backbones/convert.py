"""Import weights from other codebases into our backbones.

References
- [DiT] W. Peebles, S. Xie, "Scalable Diffusion Models with Transformers", ICCV 2023;
  facebookresearch/DiT `models.py` (module layout and state-dict key names) and
  `download.py` / `sample.py` (`find_model`: training checkpoints keep the EMA weights under
  "ema"; the released ImageNet checkpoints are bare state dicts whose label table has the
  null-class row, 1001 rows for 1000 classes).
- [SD3] P. Esser et al., ICML 2024; huggingface/diffusers `SD3Transformer2DModel`
  (`transformer_sd3.py`, `attention.py` JointTransformerBlock, `normalization.py`
  AdaLayerNormZero / AdaLayerNormContinuous): key names, separate q/k/v projections, and the
  (scale, shift) order of AdaLayerNormContinuous (the final norm and the last block's context
  norm), where our modulations, as DiT's, are (shift, scale).

Our DiT names its submodules as facebookresearch/DiT does, so the keys map 1:1; the work here
is inferring the architecture from tensor shapes and failing clearly on a foreign state dict.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch

from dit_bench.backbones.dit import DiT
from dit_bench.backbones.mmdit import MMDiT

# DiT Table 1: the paper's head count for each of its widths. Other widths need num_heads.
_PAPER_HEADS = {384: 6, 768: 12, 1024: 16, 1152: 16}

_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")
# The tensors whose shapes define the architecture.
_SHAPE_KEYS = (
    "x_embedder.proj.weight",
    "pos_embed",
    "y_embedder.embedding_table.weight",
    "final_layer.linear.weight",
)


class _StateDict(dict):
    """A state dict whose missing key is a ValueError naming it (a foreign or truncated file),
    not a bare KeyError from the middle of the mapping."""

    def __init__(self, state_dict: Mapping[str, torch.Tensor], source: str):
        super().__init__(state_dict)
        self.source = source

    def __missing__(self, key: str):
        raise ValueError(f"not a complete {self.source} state dict: missing key {key!r}")


def dit_from_original(state_dict: Mapping[str, torch.Tensor], num_heads: int | None = None) -> DiT:
    """Build our DiT from a facebookresearch/DiT state dict, architecture read off the shapes.

    depth: number of `blocks.N`; width D, in_channels C and patch p: `x_embedder.proj.weight`
    (D, C, p, p); image size: sqrt(len(pos_embed)) * p; classes: label-table rows - 1 (the last
    row is the null class); learned sigma: the final linear emits p*p*2C instead of p*p*C.
    num_heads: the paper's for widths 384/768/1024/1152, otherwise required.

    A training checkpoint {"model", "ema", ...} is accepted and its "ema" weights are used, as
    DiT's `find_model`. The returned model (float32 or the checkpoint's dtype, CPU or the
    checkpoint's device) owns copies of the tensors. Raises ValueError on missing, unexpected or
    wrongly shaped keys.
    """
    if "ema" in state_dict and isinstance(state_dict["ema"], Mapping):
        state_dict = state_dict["ema"]
    sd = _StateDict(state_dict, "facebookresearch/DiT")
    for key in _SHAPE_KEYS:
        if key not in sd:
            raise ValueError(f"not a facebookresearch/DiT state dict: missing key {key!r}")

    hidden_size, in_channels, patch_size, patch_w = sd["x_embedder.proj.weight"].shape
    if patch_size != patch_w:
        raise ValueError(f"x_embedder.proj.weight has a non-square kernel {patch_size}x{patch_w}")
    num_tokens = sd["pos_embed"].shape[-2]
    grid = math.isqrt(num_tokens)
    if grid * grid != num_tokens:
        raise ValueError(f"pos_embed has {num_tokens} tokens, not a square grid")
    num_classes = sd["y_embedder.embedding_table.weight"].shape[0] - 1
    if num_classes < 0:
        raise ValueError("y_embedder.embedding_table.weight has no rows")
    out_features = sd["final_layer.linear.weight"].shape[0]
    out_channels, rem = divmod(out_features, patch_size * patch_size)
    if rem or out_channels not in (in_channels, 2 * in_channels):
        raise ValueError(
            f"final_layer.linear emits {out_features} features; expected p*p*C = "
            f"{patch_size**2 * in_channels} or p*p*2C = {2 * patch_size**2 * in_channels}"
        )
    block_ids = sorted({int(m.group(1)) for k in sd if (m := _BLOCK_KEY.match(k))})
    if block_ids != list(range(len(block_ids))):
        raise ValueError(f"block indices are not contiguous from 0: {block_ids}")
    if num_heads is None:
        if hidden_size not in _PAPER_HEADS:
            raise ValueError(
                f"hidden_size={hidden_size} is not one of the paper's widths "
                f"{sorted(_PAPER_HEADS)}: pass num_heads"
            )
        num_heads = _PAPER_HEADS[hidden_size]

    # Build on the meta device (no init cost for XL), then take the checkpoint's tensors.
    with torch.device("meta"):
        model = DiT(
            image_size=grid * patch_size,
            in_channels=in_channels,
            num_classes=num_classes,
            depth=len(block_ids),
            hidden_size=hidden_size,
            num_heads=num_heads,
            patch_size=patch_size,
            learn_sigma=out_channels == 2 * in_channels,
        )
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"state dict does not match a DiT of depth {len(block_ids)}, width {hidden_size}: "
            f"missing keys {missing}, unexpected keys {unexpected}"
        )
    wrong = [
        f"{k}: got {tuple(sd[k].shape)}, expected {tuple(v.shape)}"
        for k, v in expected.items()
        if sd[k].shape != v.shape
    ]
    if wrong:
        raise ValueError("state dict shapes do not match: " + "; ".join(wrong))
    # assign=True replaces the meta tensors (requires_grad stays the module's: pos_embed frozen);
    # clone so the model does not alias the caller's tensors.
    model.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, assign=True)
    return model


# ---------------------------------------------------------------------------------------------
# diffusers SD3Transformer2DModel -> MMDiT
# ---------------------------------------------------------------------------------------------

_SD3_BLOCK_KEY = re.compile(r"^transformer_blocks\.(\d+)\.")


def _swap_halves(w: torch.Tensor) -> torch.Tensor:
    """(scale, shift) rows -> (shift, scale) rows, for AdaLayerNormContinuous projections."""
    scale, shift = w.chunk(2, dim=0)
    return torch.cat([shift, scale], dim=0)


def mmdit_from_diffusers(
    state_dict: Mapping[str, torch.Tensor],
    *,
    image_size: int,
    num_heads: int | None = None,
    context_tokens: int = 4,
) -> MMDiT:
    """Build our MMDiT from the state dict of a diffusers `SD3Transformer2DModel` (SD3.0 layout).

    Read off the shapes: depth (number of `transformer_blocks.N`), width D, input channels and
    patch size (`pos_embed.proj.weight`), output channels (learned sigma if 2 x input), context
    and pooled widths, QK-RMSNorm (`attn.norm_q.weight`, whose length is the head size).
    num_heads: needed without QK norm unless D is a multiple of 64 (SD3's head size 64).
    image_size: the latent side to run at; the position table is the centre crop of diffusers'
    `pos_embed_max_size` table, exactly as diffusers crops it.

    The result computes what diffusers computes, with `Cond(context=encoder_hidden_states,
    pooled=pooled_projections)`. Mapping: separate to_q/to_k/to_v -> fused qkv; the last block's
    add_q_proj (and norm_added_q) are dropped, their output is discarded in diffusers;
    AdaLayerNormContinuous rows are reordered to (shift, scale). The class-label tables, which
    SD3 does not have, are zero (a model for labels must be trained). Raises ValueError on a
    foreign or unsupported state dict (SD3.5's dual attention, LayerNorm QK norm).
    """
    sd = _StateDict(state_dict, "diffusers SD3Transformer2DModel")
    for key in ("pos_embed.proj.weight", "pos_embed.pos_embed", "proj_out.weight"):
        if key not in sd:
            raise ValueError(f"not a diffusers SD3Transformer2DModel state dict: missing {key!r}")
    if any(".attn2." in k for k in sd):
        raise ValueError("SD3.5 dual-attention blocks (attn2) are not supported")
    hidden, in_channels, patch, _ = sd["pos_embed.proj.weight"].shape
    out_channels, rem = divmod(sd["proj_out.weight"].shape[0], patch * patch)
    if rem or out_channels not in (in_channels, 2 * in_channels):
        raise ValueError(f"proj_out emits {sd['proj_out.weight'].shape[0]} features")
    ids = sorted({int(m.group(1)) for k in sd if (m := _SD3_BLOCK_KEY.match(k))})
    if not ids or ids != list(range(len(ids))):
        raise ValueError(f"transformer block indices are not contiguous from 0: {ids}")
    depth = len(ids)
    qk_norm = "transformer_blocks.0.attn.norm_q.weight" in sd
    if qk_norm:
        if "transformer_blocks.0.attn.norm_q.bias" in sd:
            raise ValueError("only qk_norm='rms_norm' is supported (found a LayerNorm)")
        heads = hidden // sd["transformer_blocks.0.attn.norm_q.weight"].shape[0]
        if num_heads not in (None, heads):  # the norm's width is the head size: no choice
            raise ValueError(f"num_heads={num_heads}: the QK-norm weights give {heads} heads")
        num_heads = heads
    elif num_heads is None:
        if hidden % 64:
            raise ValueError(f"width {hidden} is not a multiple of 64: pass num_heads")
        num_heads = hidden // 64
    grid = image_size // patch
    max_tokens = sd["pos_embed.pos_embed"].shape[-2]
    max_grid = math.isqrt(max_tokens)
    if image_size % patch or grid > max_grid:
        raise ValueError(
            f"image_size={image_size} needs a multiple of patch {patch} with at most "
            f"{max_grid} patches per side (pos_embed_max_size)"
        )

    with torch.device("meta"):
        model = MMDiT(
            image_size=image_size,
            in_channels=in_channels,
            num_classes=0,
            depth=depth,
            hidden_size=hidden,
            num_heads=num_heads,
            patch_size=patch,
            learn_sigma=out_channels == 2 * in_channels,
            qk_norm=qk_norm,
            context_tokens=context_tokens,
            context_dim=sd["context_embedder.weight"].shape[1],
            pooled_dim=sd["time_text_embed.text_embedder.linear_1.weight"].shape[1],
        )

    # diffusers crops the centre of its max-size table (PatchEmbed.cropped_pos_embed).
    top = (max_grid - grid) // 2
    table = sd["pos_embed.pos_embed"].reshape(max_grid, max_grid, hidden)
    table = table[top : top + grid, top : top + grid].reshape(1, grid * grid, hidden)

    out: dict[str, torch.Tensor] = {
        "pos_embed": table,
        "x_embedder.proj.weight": sd["pos_embed.proj.weight"],
        "x_embedder.proj.bias": sd["pos_embed.proj.bias"],
        "context_embedder.weight": sd["context_embedder.weight"],
        "context_embedder.bias": sd["context_embedder.bias"],
        "final_layer.adaLN_modulation.1.weight": _swap_halves(sd["norm_out.linear.weight"]),
        "final_layer.adaLN_modulation.1.bias": _swap_halves(sd["norm_out.linear.bias"]),
        "final_layer.linear.weight": sd["proj_out.weight"],
        "final_layer.linear.bias": sd["proj_out.bias"],
    }
    for ours, theirs in (
        ("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
        ("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2"),
        ("pooled_embedder.0", "time_text_embed.text_embedder.linear_1"),
        ("pooled_embedder.2", "time_text_embed.text_embedder.linear_2"),
    ):
        for p in ("weight", "bias"):
            out[f"{ours}.{p}"] = sd[f"{theirs}.{p}"]
    used = set(out) - {"pos_embed"} | {"pos_embed.pos_embed"}
    used |= {f"{t}.{p}" for t in (
        "pos_embed.proj", "context_embedder", "norm_out.linear", "proj_out",
        "time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_2",
        "time_text_embed.text_embedder.linear_1", "time_text_embed.text_embedder.linear_2",
    ) for p in ("weight", "bias")}  # fmt: skip

    for i in range(depth):
        src, dst = f"transformer_blocks.{i}.", f"blocks.{i}."
        last = i == depth - 1

        def take(key: str, src: str = src) -> torch.Tensor:
            used.add(src + key)
            if src + key not in sd:
                raise ValueError(f"missing key {src + key!r}")
            return sd[src + key]

        for p in ("weight", "bias"):
            out[f"{dst}adaLN_modulation.1.{p}"] = take(f"norm1.linear.{p}")
            ctx_mod = take(f"norm1_context.linear.{p}")
            out[f"{dst}context_adaLN_modulation.1.{p}"] = _swap_halves(ctx_mod) if last else ctx_mod
            out[f"{dst}qkv.{p}"] = torch.cat([take(f"attn.to_{n}.{p}") for n in "qkv"])
            out[f"{dst}proj.{p}"] = take(f"attn.to_out.0.{p}")
            out[f"{dst}mlp.fc1.{p}"] = take(f"ff.net.0.proj.{p}")
            out[f"{dst}mlp.fc2.{p}"] = take(f"ff.net.2.{p}")
            if last:
                out[f"{dst}context_kv.{p}"] = torch.cat(
                    [take(f"attn.add_{n}_proj.{p}") for n in "kv"]
                )
                take(f"attn.add_q_proj.{p}")  # dead in diffusers: the context output is dropped
            else:
                out[f"{dst}context_qkv.{p}"] = torch.cat(
                    [take(f"attn.add_{n}_proj.{p}") for n in "qkv"]
                )
                out[f"{dst}context_proj.{p}"] = take(f"attn.to_add_out.{p}")
                out[f"{dst}context_mlp.fc1.{p}"] = take(f"ff_context.net.0.proj.{p}")
                out[f"{dst}context_mlp.fc2.{p}"] = take(f"ff_context.net.2.{p}")
        if qk_norm:
            out[f"{dst}q_norm.weight"] = take("attn.norm_q.weight")
            out[f"{dst}k_norm.weight"] = take("attn.norm_k.weight")
            out[f"{dst}context_k_norm.weight"] = take("attn.norm_added_k.weight")
            if last:
                take("attn.norm_added_q.weight")  # dead, as add_q_proj
            else:
                out[f"{dst}context_q_norm.weight"] = take("attn.norm_added_q.weight")

    unexpected = sorted(set(sd) - used)
    if unexpected:
        raise ValueError(f"unexpected keys for an SD3 MMDiT of depth {depth}: {unexpected}")
    ref = next(iter(sd.values()))
    for name in ("y_context.embedding_table.weight", "y_pooled.embedding_table.weight"):
        shape = model.get_parameter(name).shape
        out[name] = torch.zeros(shape, dtype=ref.dtype, device=ref.device)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(out))
    wrong = [
        f"{k}: got {tuple(out[k].shape)}, expected {tuple(v.shape)}"
        for k, v in expected.items()
        if k in out and out[k].shape != v.shape
    ]
    if missing or wrong:
        raise ValueError(f"state dict does not fit: missing {missing}; shapes {wrong}")
    model.load_state_dict({k: v.detach().clone() for k, v in out.items()}, assign=True)
    return model
