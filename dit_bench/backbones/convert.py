"""Import weights from other codebases into our backbones.

References
- [DiT] W. Peebles, S. Xie, "Scalable Diffusion Models with Transformers", ICCV 2023;
  facebookresearch/DiT `models.py` (module layout and state-dict key names) and
  `download.py` / `sample.py` (`find_model`: training checkpoints keep the EMA weights under
  "ema"; the released ImageNet checkpoints are bare state dicts whose label table has the
  null-class row, 1001 rows for 1000 classes).

Our DiT names its submodules as facebookresearch/DiT does, so the keys map 1:1; the work here
is inferring the architecture from tensor shapes and failing clearly on a foreign state dict.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch

from dit_bench.backbones.dit import DiT, build_dit

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
    sd = dict(state_dict)
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
        model = build_dit(
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
