"""Whole forward passes and inits checked against slow, explicit references of the papers.

The other backbone tests pin shapes, MAC counts and single blocks; one-line wiring errors in the
model-level forward (which tokens are dropped, which long skip goes where, token order, concat
order, scale/shift order, the resampling mode, which layers are zero-initialised) keep every
shape and every MAC count, so only a value check catches them. Each reference here recomposes
the forward from the model's own parameters in the order the paper and its reference code give:

- DiT [Peebles & Xie 2023, Sec. 3.2]: in-context conditioning appends t and y as two tokens at
  the start of the sequence and removes them after the last block; plain adaLN keeps the
  xavier init of every modulation (the final one included), only adaLN-Zero zeroes them.
- U-ViT [Bao et al. 2023; baofff/U-ViT `libs/uvit.py`]: tokens [label, time, patches] plus a
  learned position per token; out-block i takes the output of in-block (n - 1 - i) through
  skip_linear(cat([x, skip])); exact (erf) GELU in the MLPs; the two extra tokens are dropped
  after the decoder; the label table keeps nn.Embedding's N(0, 1) init.
- ADM ResBlock [Dhariwal & Nichol 2021; openai/guided-diffusion `unet.py`]: nearest 2x
  upsampling; use_scale_shift_norm: `scale, shift = chunk(emb_out, 2)`,
  `h = norm(h) * (1 + scale) + shift`.
- ADM U-Net, whole: the block ladder as `UNetModel.__init__` builds it (levels, res blocks,
  attention at the listed downsampling factors, down/up ResBlocks), the long skips popped in
  reverse, the Res-Attn-Res middle, legacy [q_h, k_h, v_h] attention heads, the class
  embedding added to the time embedding, the zero-initialised GN-SiLU-conv output.
- MMDiT [Esser et al. 2024, Fig. 2; Stability's sd3 `mmditx.py`]: the label-derived context
  tokens and pooled vector, per-stream modulation and weights, joint attention over
  concat(context, x), the pre-only last block, the final layer's (shift, scale).

Every weight is randomised (the zero-initialised ones would make outputs trivially 0) and the
comparison runs in float64, so any reordering shows up far above rounding. Attention, MLP,
LayerNorm, GroupNorm, the sinusoid, resampling and unpatchify are written out here, not taken
from `layers`, so a reference never shares the code it checks.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dit_bench.backbones import Cond, build_backbone
from dit_bench.backbones.unet import ResBlock

SIZE, C, N_CLASSES = 8, 3, 5
F64 = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")


def randomise(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> None:
    """Every parameter random, the zero-initialised and frozen ones included, so every path
    (final layer, skip fusions, position tables) carries signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


def inputs(b: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, C, SIZE, SIZE, generator=g, dtype=F64)
    t = torch.rand(b, generator=g, dtype=F64) * 1000
    y = torch.tensor([0, 4, N_CLASSES])[:b]  # the last one is the null class
    return x, t, Cond(labels=y)


# ---------------------------------------------------------------------------------------------
# Explicit primitives (deliberately naive)
# ---------------------------------------------------------------------------------------------


def lin(layer: torch.nn.Linear, z: torch.Tensor) -> torch.Tensor:
    out = z @ layer.weight.T
    return out if layer.bias is None else out + layer.bias


def layer_norm(norm: torch.nn.LayerNorm, z: torch.Tensor) -> torch.Tensor:
    mu = z.mean(-1, keepdim=True)
    out = (z - mu) / torch.sqrt(((z - mu) ** 2).mean(-1, keepdim=True) + norm.eps)
    return out if norm.weight is None else out * norm.weight + norm.bias


def gelu_tanh(z: torch.Tensor) -> torch.Tensor:
    return 0.5 * z * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)))


def gelu_exact(z: torch.Tensor) -> torch.Tensor:
    return 0.5 * z * (1 + torch.erf(z / math.sqrt(2)))


def mlp(m, z: torch.Tensor, act=gelu_tanh) -> torch.Tensor:
    return lin(m.fc2, act(lin(m.fc1, z)))


def self_attention(attn, z: torch.Tensor) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) V, one head at a time; fused qkv columns are [Q | K | V], each
    split into consecutive head slices (timm's layout, used by DiT and U-ViT)."""
    d, heads = z.shape[-1], attn.num_heads
    dh = d // heads
    q, k, v = lin(attn.qkv, z).split(d, dim=-1)
    outs = []
    for h in range(heads):
        sl = slice(h * dh, (h + 1) * dh)
        s = q[..., sl] @ k[..., sl].transpose(-1, -2) / math.sqrt(dh)
        outs.append(torch.softmax(s, dim=-1) @ v[..., sl])
    return lin(attn.proj, torch.cat(outs, dim=-1))


def sinusoid(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[cos(t f_i) | sin(t f_i)], f_i = 10000^(-i / (dim/2)) (DiT's and U-ViT's layout)."""
    half = dim // 2
    freqs = torch.tensor([10000.0 ** (-i / half) for i in range(half)], dtype=F64)
    args = t[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def patchify(conv: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Each p x p patch, row-major over the grid, through the patch conv as a linear map."""
    p = conv.kernel_size[0]
    b, _, hgt, wid = x.shape
    w = conv.weight.reshape(conv.out_channels, -1)
    tokens = [
        x[:, :, i : i + p, j : j + p].reshape(b, -1) @ w.T + conv.bias
        for i in range(0, hgt, p)
        for j in range(0, wid, p)
    ]
    return torch.stack(tokens, dim=1)  # (B, T, D)


def unpatchify_loops(h: torch.Tensor, p: int, channels: int) -> torch.Tensor:
    """Token (i, j) holds its patch's pixels in (row, col, channel) order, as DiT/U-ViT."""
    b, t, _ = h.shape
    g = math.isqrt(t)
    out = torch.zeros(b, channels, g * p, g * p, dtype=h.dtype)
    for i in range(g):
        for j in range(g):
            patch = h[:, i * g + j].reshape(b, p, p, channels).permute(0, 3, 1, 2)
            out[:, :, i * p : (i + 1) * p, j * p : (j + 1) * p] = patch
    return out


def silu(z: torch.Tensor) -> torch.Tensor:
    return z * torch.sigmoid(z)


# ---------------------------------------------------------------------------------------------
# DiT
# ---------------------------------------------------------------------------------------------


def dit(conditioning: str, learn_sigma: bool = True):
    torch.manual_seed(0)
    net = build_backbone(
        "dit-xs/2",
        image_size=SIZE,
        in_channels=C,
        num_classes=N_CLASSES,
        conditioning=conditioning,
        learn_sigma=learn_sigma,
        depth=2,
        hidden_size=32,
        num_heads=2,
    )
    return net


def dit_reference(net, x, t, labels) -> torch.Tensor:
    """DiT forward [Sec. 3.2] from the model's parameters. The block internals for the three
    vector/sequence-conditioned schemes are covered block by block in test_backbones.py, so
    they run as the model's blocks; the in-context block and everything around the blocks
    (embedding, token layout, token removal, final layer) are written out."""
    d = net.pos_embed.shape[-1]
    h = patchify(net.x_embedder.proj, x) + net.pos_embed  # positions on the patches only
    te = net.t_embedder.mlp
    t_emb = lin(te[2], silu(lin(te[0], sinusoid(t, net.t_embedder.frequency_embedding_size))))
    y_emb = net.y_embedder.embedding_table.weight[labels]
    if net.conditioning == "in_context":
        # "we simply append the vector embeddings of t and c as two additional tokens in the
        # input sequence ... After the final block, we remove the conditioning tokens."
        h = torch.cat([t_emb[:, None], y_emb[:, None], h], dim=1)
        for blk in net.blocks:
            h = h + self_attention(blk.attn, layer_norm(blk.norm1, h))
            h = h + mlp(blk.mlp, layer_norm(blk.norm2, h))
        h = h[:, 2:]
        assert h.shape[1] == net.x_embedder.num_patches
        c = None
    else:
        c = torch.stack([t_emb, y_emb], 1) if net.conditioning == "cross_attn" else t_emb + y_emb
        for blk in net.blocks:
            h = blk(h, c)
    fl = net.final_layer
    h = layer_norm(fl.norm_final, h)
    if fl.adaptive:  # "the final layer norm (adaptive if using adaLN)": shift first, then scale
        mod = lin(fl.adaLN_modulation[1], silu(c))
        shift, scale = mod[:, :d], mod[:, d:]
        h = h * (1 + scale[:, None]) + shift[:, None]
    return unpatchify_loops(lin(fl.linear, h), net.patch_size, net.out_channels)


@pytest.mark.parametrize("conditioning", ["in_context", "adaln_zero", "adaln", "cross_attn"])
def test_dit_forward_equals_paper_reference(conditioning):
    net = dit(conditioning).double()
    randomise(net)
    x, t, cond = inputs()
    got = net(x, t, cond)
    torch.testing.assert_close(got, dit_reference(net, x, t, cond.labels), rtol=1e-9, atol=1e-9)


def test_dit_in_context_final_layer_sees_the_patch_tokens_of_the_last_block():
    # [DiT Sec. 3.2]: t and y are tokens 0 and 1; "after the final block, we remove the
    # conditioning tokens". The final layer must get tokens 2 .. T+1 of the last block's
    # output, in order: dropping the last two tokens instead keeps every shape.
    net = dit("in_context").double()
    randomise(net)
    x, t, cond = inputs()
    seen = {}

    def capture(module, args):
        seen["h"] = args[0]

    net.final_layer.register_forward_pre_hook(capture)
    net(x, t, cond)
    hidden = seen["h"]
    # Recompute the last block's full output (2 + T tokens) and check the final layer saw
    # exactly its tokens 2..T+1, the patches in order.
    h = patchify(net.x_embedder.proj, x) + net.pos_embed
    te = net.t_embedder.mlp
    t_emb = lin(te[2], silu(lin(te[0], sinusoid(t, 256))))
    y_emb = net.y_embedder.embedding_table.weight[cond.labels]
    h = torch.cat([t_emb[:, None], y_emb[:, None], h], dim=1)
    for blk in net.blocks:
        h = blk(h)
    torch.testing.assert_close(hidden, h[:, 2:], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("conditioning", "final_zeroed", "blocks_zeroed"),
    [("adaln_zero", True, True), ("adaln", False, False)],
)
def test_dit_modulation_init_is_xavier_except_for_adaln_zero(
    conditioning, final_zeroed, blocks_zeroed
):
    # [DiT Sec. 3.2]: adaLN-Zero is adaLN plus zero-initialising the regression of every
    # modulation; plain adaLN keeps the xavier-uniform init of the transformer linears for the
    # block modulations and for the final layer's. The output linear is zero in both (DiT code).
    net = dit(conditioning)
    fin = net.final_layer.adaLN_modulation[1]
    mods = [fin] + [blk.adaLN_modulation[1] for blk in net.blocks]
    zeroed = [final_zeroed] + [blocks_zeroed] * len(net.blocks)
    for layer, zero in zip(mods, zeroed, strict=True):
        assert torch.count_nonzero(layer.bias) == 0
        w = layer.weight
        if zero:
            assert torch.count_nonzero(w) == 0
            continue
        assert torch.count_nonzero(w) > 0, "modulation zeroed, but only adaLN-Zero zeroes it"
        bound = math.sqrt(6 / (w.shape[0] + w.shape[1]))  # xavier-uniform on (fan_out, fan_in)
        assert w.abs().max() <= bound
        # U(-a, a) has std a / sqrt(3); 2048 or 4096 draws pin it within a few percent.
        assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)
    assert torch.count_nonzero(net.final_layer.linear.weight) == 0


def test_dit_embedders_init_as_dit():
    # DiT `initialize_weights`: label table N(0, 0.02) (nn.Embedding's own is N(0, 1)), patch
    # conv xavier-uniform over the flattened (C p p) patch, zero bias; the forward reference
    # randomises every weight and cannot see either.
    net = dit("adaln_zero")
    assert net.y_embedder.embedding_table.weight.std().item() == pytest.approx(0.02, rel=0.25)
    w = net.x_embedder.proj.weight.flatten(1)  # (D, C p p)
    bound = math.sqrt(6 / (w.shape[0] + w.shape[1]))
    assert w.abs().max() <= bound
    assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)
    assert not net.x_embedder.proj.bias.any()


# ---------------------------------------------------------------------------------------------
# U-ViT
# ---------------------------------------------------------------------------------------------


def uvit(learn_sigma: bool = True, depth: int = 5):
    # depth 5 = 2 in-blocks, mid, 2 out-blocks: with a single in-block the order in which
    # skips are taken back could not be seen.
    torch.manual_seed(0)
    return build_backbone(
        "uvit-xs/2",
        image_size=SIZE,
        in_channels=C,
        num_classes=N_CLASSES,
        learn_sigma=learn_sigma,
        depth=depth,
        hidden_size=32,
        num_heads=2,
    )


def uvit_block(blk, h: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
    if skip is not None:  # U-ViT: self.skip_linear(torch.cat([x, skip], dim=-1))
        h = lin(blk.skip_linear, torch.cat([h, skip], dim=-1))
    h = h + self_attention(blk.attn, layer_norm(blk.norm1, h))
    # U-ViT's Block: timm's Mlp with act_layer=nn.GELU, the exact erf form (DiT's is tanh)
    return h + mlp(blk.mlp, layer_norm(blk.norm2, h), act=gelu_exact)


def uvit_reference(net, x, t, labels) -> torch.Tensor:
    """baofff/U-ViT `UViT.forward`: patch_embed; x = cat(time_token, x); x = cat(label_emb, x);
    x + pos_embed; in_blocks appending to skips; mid_block; out_blocks(x, skips.pop());
    norm; decoder_pred; drop the extras; unpatchify; final conv."""
    d = net.pos_embed.shape[-1]
    h = patchify(net.patch_embed.proj, x)
    time_token = sinusoid(t, d)[:, None]  # mlp_time_embed=False: the sinusoid is the token
    label_token = net.label_emb.embedding_table.weight[labels][:, None]
    h = torch.cat([label_token, time_token, h], dim=1) + net.pos_embed
    in_outputs = []
    for blk in net.in_blocks:
        h = uvit_block(blk, h)
        in_outputs.append(h)
    h = uvit_block(net.mid_block, h)
    for i, blk in enumerate(net.out_blocks):
        # the first out-block takes the last in-block's output: mirrored like a U-Net
        h = uvit_block(blk, h, in_outputs[len(in_outputs) - 1 - i])
    h = lin(net.decoder_pred, layer_norm(net.norm, h))
    h = h[:, 2:]  # label and time tokens are the first two
    out = unpatchify_loops(h, net.patch_size, net.out_channels)
    if net.final_layer is not None:
        conv = net.final_layer
        out = F.conv2d(out, conv.weight, conv.bias, padding=1)
    return out


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_uvit_forward_equals_paper_reference(learn_sigma):
    net = uvit(learn_sigma).double()
    randomise(net)
    assert len(net.in_blocks) == len(net.out_blocks) == 2 and net.final_layer is not None
    x, t, cond = inputs()
    torch.testing.assert_close(
        net(x, t, cond), uvit_reference(net, x, t, cond.labels), rtol=1e-9, atol=1e-9
    )


def test_uvit_init_follows_the_reference():
    # baofff/U-ViT: trunc_normal_(pos_embed, std=.02), then self.apply(_init_weights), which
    # touches only Linear and LayerNorm: the label nn.Embedding keeps PyTorch's N(0, 1).
    net = uvit()
    label = net.label_emb.embedding_table.weight  # (N_CLASSES + 1, 32): 192 draws
    assert 0.8 < label.std().item() < 1.2
    assert 0.01 < net.pos_embed.std().item() < 0.03
    for name, m in net.named_modules():
        if isinstance(m, torch.nn.Linear):
            assert m.weight.std().item() < 0.03, name
            assert m.bias is None or not m.bias.any(), name
    # qkv_bias=False in every U-ViT config: a zero-initialised bias would still be trained
    blocks = [*net.in_blocks, net.mid_block, *net.out_blocks]
    assert all(blk.attn.qkv.bias is None for blk in blocks)


def test_uvit_long_skips_pair_last_in_block_with_first_out_block():
    # The wiring itself, independent of the numeric reference: out-block i receives, as its
    # skip, exactly the tensor in-block (n - 1 - i) produced.
    net = uvit().double()
    randomise(net)
    in_out, skips = [], []
    for blk in net.in_blocks:
        blk.register_forward_hook(lambda m, a, out: in_out.append(out))
    for blk in net.out_blocks:
        blk.register_forward_pre_hook(lambda m, a: skips.append(a[1]))
    net(*inputs())
    assert len(in_out) == len(skips) == 2
    assert skips[0] is in_out[1] and skips[1] is in_out[0]


def test_uvit_skip_fusion_concatenates_x_before_skip():
    # U-ViT: skip_linear(cat([x, skip])): the first D input columns of skip_linear read x.
    net = uvit().double()
    randomise(net)
    blk = net.out_blocks[0]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, net.num_tokens, 32, generator=g, dtype=F64)
    skip = torch.randn(2, net.num_tokens, 32, generator=g, dtype=F64)
    torch.testing.assert_close(blk(x, skip), uvit_block(blk, x, skip), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(blk(x, skip), blk(skip, x))  # the order is observable


def test_uvit_token_order_is_label_time_patches():
    # baofff/U-ViT prepends the time token, then the label token: [label, time, patches], and
    # each gets its own learned position. A swapped order keeps every shape; with distinct
    # learned positions it changes the output, and here it is pinned at the first block's input.
    net = uvit().double()
    randomise(net)
    x, t, cond = inputs()
    seen = {}

    def capture(module, args):
        seen["h"] = args[0]

    handle = net.in_blocks[0].register_forward_pre_hook(capture)
    net(x, t, cond)
    handle.remove()
    h = seen["h"]
    label = net.label_emb.embedding_table.weight[cond.labels]
    time = sinusoid(t, 32)
    torch.testing.assert_close(h[:, 0], label + net.pos_embed[0, 0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h[:, 1], time + net.pos_embed[0, 1], rtol=1e-12, atol=1e-12)


def test_uvit_drops_the_leading_extra_tokens_before_unpatchify():
    # The decoder runs over all 2 + T tokens (as U-ViT); the image comes from the last T.
    net = uvit().double()
    randomise(net)
    net.final_layer = None  # see the decoder's tokens directly as pixels
    x, t, cond = inputs()
    seen = {}
    net.decoder_pred.register_forward_hook(lambda m, a, out: seen.setdefault("h", out))
    out = net(x, t, cond)
    want = unpatchify_loops(seen["h"][:, 2:], net.patch_size, net.out_channels)
    torch.testing.assert_close(out, want, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# ADM U-Net residual block
# ---------------------------------------------------------------------------------------------


def group_norm(gn: torch.nn.GroupNorm, z: torch.Tensor) -> torch.Tensor:
    # ADM's `normalization` is GroupNorm32: 32 groups, torch's eps, fixed here rather than read
    # off the module, which only supplies the affine weights
    b, ch, hgt, wid = z.shape
    g = z.reshape(b, 32, ch // 32, hgt, wid)
    mu = g.mean(dim=(2, 3, 4), keepdim=True)
    var = ((g - mu) ** 2).mean(dim=(2, 3, 4), keepdim=True)
    out = ((g - mu) / torch.sqrt(var + 1e-5)).reshape(b, ch, hgt, wid)
    return out * gn.weight[None, :, None, None] + gn.bias[None, :, None, None]


def resample(z: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "up":  # nearest: every pixel copied into a 2 x 2 block
        return z.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)
    if mode == "down":  # 2 x 2 average pooling
        b, ch, hgt, wid = z.shape
        return z.reshape(b, ch, hgt // 2, 2, wid // 2, 2).mean(dim=(3, 5))
    return z


def conv(layer: torch.nn.Conv2d, z: torch.Tensor) -> torch.Tensor:
    return F.conv2d(z, layer.weight, layer.bias, padding=layer.padding)


def adm_resblock(blk, x: torch.Tensor, emb: torch.Tensor, mode: str) -> torch.Tensor:
    """guided-diffusion ResBlock with use_scale_shift_norm and up/down:
    h = in_rest(h_upd(in_norm_act(x))); x = x_upd(x)
    emb_out = emb_layers(emb); scale, shift = chunk(emb_out, 2, dim=1)
    h = out_rest(out_norm(h) * (1 + scale) + shift); return skip(x) + h"""
    h = silu(group_norm(blk.in_layers[0], x))
    h = conv(blk.in_layers[2], resample(h, mode))
    emb_out = lin(blk.emb_layers[1], silu(emb))
    c_out = emb_out.shape[1] // 2
    scale, shift = emb_out[:, :c_out, None, None], emb_out[:, c_out:, None, None]
    h = group_norm(blk.out_layers[0], h) * (1 + scale) + shift
    h = conv(blk.out_layers[3], silu(h))
    skip = resample(x, mode)
    if isinstance(blk.skip_connection, torch.nn.Conv2d):
        skip = conv(blk.skip_connection, skip)
    return skip + h


@pytest.mark.parametrize(
    ("channels", "out_channels", "mode"),
    [(64, 64, "up"), (64, 32, "up"), (64, 64, "down"), (32, 64, "")],
)
def test_adm_resblock_equals_guided_diffusion_reference(channels, out_channels, mode):
    torch.manual_seed(0)
    blk = ResBlock(channels, 16, out_channels, resample=mode).double()
    randomise(blk)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, channels, 4, 4, generator=g, dtype=F64)
    emb = torch.randn(2, 16, generator=g, dtype=F64)
    got = blk(x, emb)
    want = adm_resblock(blk, x, emb, mode)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_adm_resblock_scale_multiplies_and_shift_adds():
    # use_scale_shift_norm: the first half of emb_out scales, the second half shifts. Set the
    # regression so that scale = -1 and shift = s: the normalised activations are wiped out
    # and out_layers see exactly SiLU(s) everywhere, whatever the input.
    torch.manual_seed(0)
    blk = ResBlock(32, 8, 32).double()
    randomise(blk)
    lin_emb = blk.emb_layers[1]
    s = torch.linspace(-1, 1, 32, dtype=F64)
    with torch.no_grad():
        lin_emb.weight.zero_()
        lin_emb.bias.copy_(torch.cat([-torch.ones(32, dtype=F64), s]))
    x = torch.randn(2, 32, 4, 4, dtype=F64)
    emb = torch.randn(2, 8, dtype=F64)
    flat = silu(s)[None, :, None, None].expand(2, 32, 4, 4)
    want = x + conv(blk.out_layers[3], flat)
    torch.testing.assert_close(blk(x, emb), want, rtol=1e-10, atol=1e-10)


def test_adm_upsampling_is_nearest_neighbour():
    # With an identity-like block the "up" path is visible directly: zero the residual branch
    # and the output is the skip of the upsampled input, every 2 x 2 block one input pixel.
    torch.manual_seed(0)
    blk = ResBlock(32, 8, 32, resample="up").double()
    blk.zero_init()
    x = torch.randn(1, 32, 3, 3, dtype=F64)
    out = blk(x, torch.randn(1, 8, dtype=F64))
    assert out.shape == (1, 32, 6, 6)
    for i in range(6):
        for j in range(6):
            torch.testing.assert_close(out[..., i, j], x[..., i // 2, j // 2], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# ADM U-Net, the whole network
# ---------------------------------------------------------------------------------------------

# Small enough for float64 loops, large enough to reach every wiring choice: three levels of
# different widths (32, 64, 64) and sides (8, 4, 2), two res blocks per level, attention at two
# levels, one of them with two heads (64 channels of 32).
ADM_SPEC = dict(
    depth=2, hidden_size=32, channel_mult=(1, 2, 2), attention_ds=(2, 4), head_channels=32
)


def adm_unet(learn_sigma: bool = True):
    from dit_bench.backbones.unet import UNet

    torch.manual_seed(0)
    return UNet(
        image_size=SIZE, in_channels=C, num_classes=N_CLASSES, learn_sigma=learn_sigma, **ADM_SPEC
    )


def adm_attention(blk, x: torch.Tensor, head_channels: int) -> torch.Tensor:
    """guided-diffusion AttentionBlock with QKVAttentionLegacy, the layout of its released
    ImageNet-256 model: qkv = Conv1d(GN(x)); the 3C channels come per head as [q_h, k_h, v_h],
    ch = head_channels each; weights = softmax_s(sum_c q[c, t] k[c, s] / sqrt(ch));
    a[c, t] = sum_s weights[t, s] v[c, s]; out = x + proj_out(concat_h a_h), zero-init proj."""
    b, c, hgt, wid = x.shape
    z = group_norm(blk.norm, x).reshape(b, c, hgt * wid)
    qkv = F.conv1d(z, blk.qkv.weight, blk.qkv.bias)  # (B, 3C, T)
    heads, ch = c // head_channels, head_channels
    outs = []
    for h in range(heads):
        q, k, v = qkv[:, 3 * ch * h : 3 * ch * (h + 1)].split(ch, dim=1)  # (B, ch, T) each
        w = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(ch), dim=-1)  # (B, T, S)
        outs.append(v @ w.transpose(1, 2))  # (B, ch, T)
    a = F.conv1d(torch.cat(outs, dim=1), blk.proj_out.weight, blk.proj_out.bias)
    return x + a.reshape(b, c, hgt, wid)


def adm_unet_reference(net, spec: dict, x, t, labels) -> torch.Tensor:
    """guided-diffusion `UNetModel` (resblock_updown, use_scale_shift_norm) built from `spec`
    as its __init__ builds it, walking the model's modules in that order:
    emb = time_embed(timestep_embedding(t, model_channels)) + label_emb(y); the input blocks
    (stem conv; per level num_res_blocks x [ResBlock(-> mult * base) (+ attention if ds in
    attention_ds)], then a down ResBlock except on the last level), each output kept in `hs`;
    middle = ResBlock, AttentionBlock, ResBlock; per level in reverse, num_res_blocks + 1 x
    [ResBlock(cat([h, hs.pop()])) (+ attention) (+ up ResBlock after the level's last, except
    level 0)]; out = zero_conv(SiLU(GN(h)))."""
    base, mult, n_res = spec["hidden_size"], spec["channel_mult"], spec["depth"]
    attn_ds, head_ch = spec["attention_ds"], spec["head_channels"]
    te = net.time_embed
    emb = lin(te[2], silu(lin(te[0], sinusoid(t, base))))  # sinusoid of width model_channels
    emb = emb + net.label_emb.embedding_table.weight[labels]  # class embedding added to it

    def resblock(layer, h, mode, out_ch):
        assert isinstance(layer, ResBlock) and layer.resample == mode
        h = adm_resblock(layer, h, emb, mode)
        assert h.shape[1] == out_ch
        return h

    blocks = iter(net.input_blocks)
    (stem,) = next(blocks)
    h = conv(stem, x)
    hs, ds = [h], 1
    for level, m in enumerate(mult):
        for _ in range(n_res):
            layers = list(next(blocks))
            h = resblock(layers[0], h, "", m * base)
            if ds in attn_ds:
                h = adm_attention(layers[1], h, head_ch)
            assert len(layers) == 1 + (ds in attn_ds)
            hs.append(h)
        if level != len(mult) - 1:
            (down,) = next(blocks)
            h = resblock(down, h, "down", m * base)
            hs.append(h)
            ds *= 2
    assert next(blocks, None) is None
    res1, attn, res2 = net.middle_block
    ch = mult[-1] * base
    h = resblock(res2, adm_attention(attn, resblock(res1, h, "", ch), head_ch), "", ch)
    outs = iter(net.output_blocks)
    for level, m in reversed(list(enumerate(mult))):
        for i in range(n_res + 1):
            layers = list(next(outs))
            h = resblock(layers[0], torch.cat([h, hs.pop()], dim=1), "", m * base)
            k = 1
            if ds in attn_ds:
                h = adm_attention(layers[k], h, head_ch)
                k += 1
            if level and i == n_res:
                h = resblock(layers[k], h, "up", m * base)
                k += 1
                ds //= 2
            assert k == len(layers)
    assert next(outs, None) is None and not hs
    return conv(net.out[2], silu(group_norm(net.out[0], h)))


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_adm_unet_forward_equals_guided_diffusion_reference(learn_sigma):
    net = adm_unet(learn_sigma).double()
    randomise(net)
    x, t, cond = inputs()
    want = adm_unet_reference(net, ADM_SPEC, x, t, cond.labels)
    assert want.shape == (3, 2 * C if learn_sigma else C, SIZE, SIZE)
    torch.testing.assert_close(net(x, t, cond), want, rtol=1e-9, atol=1e-9)


def test_adm_unet_zero_inits_every_residual_branch_and_the_output():
    # guided-diffusion `zero_module`: each ResBlock's last conv, each attention's proj_out and
    # the output conv; every other layer keeps PyTorch's default init (the label table too).
    from dit_bench.backbones.unet import AttentionBlock

    net = adm_unet()
    zeroed = [net.out[2]]
    for m in net.modules():
        if isinstance(m, ResBlock):
            zeroed.append(m.out_layers[3])
        elif isinstance(m, AttentionBlock):
            zeroed.append(m.proj_out)
    # the output conv; 21 ResBlocks: 3 x 2 + 2 down, 2 middle, 3 x 3 + 2 up; 11 attentions:
    # 2 x 2 in the encoder, 1 middle, 2 x 3 in the decoder
    assert len(zeroed) == 1 + (3 * 2 + 2 + 2 + 3 * 3 + 2) + (2 * 2 + 1 + 2 * 3)
    for layer in zeroed:
        assert not layer.weight.any() and not layer.bias.any()
    zero_ids = {id(p) for layer in zeroed for p in layer.parameters()}
    for name, p in net.named_parameters():
        if id(p) not in zero_ids and p.dim() > 1:
            assert p.std() > 0, name
    assert 0.8 < net.label_emb.embedding_table.weight.std().item() < 1.2  # nn.Embedding N(0, 1)
    x, t, cond = inputs()
    assert not net(x.float(), t.float(), cond).any()


# ---------------------------------------------------------------------------------------------
# MMDiT (SD3), the whole network with the label-derived context
# ---------------------------------------------------------------------------------------------


def mmdit(qk_norm: bool, learn_sigma: bool = True):
    torch.manual_seed(0)
    return build_backbone(
        "mmdit-d2/2",
        image_size=SIZE,
        in_channels=C,
        num_classes=N_CLASSES,
        learn_sigma=learn_sigma,
        depth=3,
        hidden_size=32,
        num_heads=2,
        qk_norm=qk_norm,
    )


def rms_norm(norm: torch.nn.RMSNorm, z: torch.Tensor) -> torch.Tensor:
    return z / torch.sqrt((z**2).mean(-1, keepdim=True) + norm.eps) * norm.weight


def mmdit_reference(net, x, t, labels) -> torch.Tensor:
    """SD3 [Esser et al. 2024, Fig. 2; Stability's sd3 reference `mmditx.py`, MMDiTX.forward
    and `_block_mixing`]: c = t_embedder(t) + y_embedder(pooled); context = context_embedder
    (context); per block each stream regresses (shift, scale, gate) x 2 from c (the last
    block's context only (shift, scale): pre_only) and projects its own q, k, v; attention
    over concat(context, x), context first as the reference; the outputs split back; the
    last block keeps no context output. Final layer: shift, scale = chunk(adaLN(c), 2)."""
    d, b, s = net.pos_embed.shape[-1], x.shape[0], net.context_tokens
    heads = net.blocks[0].num_heads
    dh = d // heads
    h = patchify(net.x_embedder.proj, x) + net.pos_embed  # positions on the image tokens only
    te = net.t_embedder.mlp
    c = lin(te[2], silu(lin(te[0], sinusoid(t, 256))))
    pooled = net.y_pooled.embedding_table.weight[labels]  # the label's pooled vector
    c = c + lin(net.pooled_embedder[2], silu(lin(net.pooled_embedder[0], pooled)))
    context = net.y_context.embedding_table.weight[labels].reshape(b, s, -1)  # S tokens
    ctx = lin(net.context_embedder, context)
    silu_c = silu(c)

    def ln(z):
        return layer_norm(torch.nn.LayerNorm(d, elementwise_affine=False, eps=1e-6), z)

    def heads_of(z, norm):  # (B, L, D) -> per-head list, each (B, L, dh), QK-RMSNorm per head
        parts = [z[..., i * dh : (i + 1) * dh] for i in range(heads)]
        return [rms_norm(norm, p) for p in parts] if norm is not None else parts

    for blk in net.blocks:
        pre_only = blk.context_pre_only
        mx = lin(blk.adaLN_modulation[1], silu_c).chunk(6, dim=1)
        mc = lin(blk.context_adaLN_modulation[1], silu_c).chunk(2 if pre_only else 6, dim=1)
        hx = ln(h) * (1 + mx[1][:, None]) + mx[0][:, None]  # shift_msa, scale_msa
        hc = ln(ctx) * (1 + mc[1][:, None]) + mc[0][:, None]
        qx, kx, vx = lin(blk.qkv, hx).split(d, dim=-1)
        if pre_only:
            kc, vc = lin(blk.context_kv, hc).split(d, dim=-1)
            qc = torch.zeros_like(kc)  # the reference computes it; nothing reads its output
        else:
            qc, kc, vc = lin(blk.context_qkv, hc).split(d, dim=-1)
        qn = blk.qk_norm
        qx, kx = heads_of(qx, blk.q_norm if qn else None), heads_of(kx, blk.k_norm if qn else None)
        kc = heads_of(kc, blk.context_k_norm if qn else None)
        qc = heads_of(qc, blk.context_q_norm if qn and not pre_only else None)
        vx, vc = heads_of(vx, None), heads_of(vc, None)
        outs = []
        for i in range(heads):
            q = torch.cat([qc[i], qx[i]], dim=1)  # concat(context, x)
            k = torch.cat([kc[i], kx[i]], dim=1)
            v = torch.cat([vc[i], vx[i]], dim=1)
            outs.append(torch.softmax(q @ k.transpose(1, 2) / math.sqrt(dh), dim=-1) @ v)
        o = torch.cat(outs, dim=-1)
        oc, ox = o[:, :s], o[:, s:]
        h = h + mx[2][:, None] * lin(blk.proj, ox)
        h = h + mx[5][:, None] * mlp(blk.mlp, ln(h) * (1 + mx[4][:, None]) + mx[3][:, None])
        if pre_only:
            ctx = None
            continue
        ctx = ctx + mc[2][:, None] * lin(blk.context_proj, oc)
        ctx = ctx + mc[5][:, None] * mlp(
            blk.context_mlp, ln(ctx) * (1 + mc[4][:, None]) + mc[3][:, None]
        )
    assert ctx is None  # the last block is pre-only
    fl = net.final_layer
    mod = lin(fl.adaLN_modulation[1], silu_c)
    shift, scale = mod[:, :d], mod[:, d:]  # sd3 FinalLayer: shift first (diffusers swaps)
    h = ln(h) * (1 + scale[:, None]) + shift[:, None]
    return unpatchify_loops(lin(fl.linear, h), net.patch_size, net.out_channels)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_mmdit_forward_with_labels_equals_sd3_reference(qk_norm):
    net = mmdit(qk_norm).double()
    randomise(net)
    assert [blk.context_pre_only for blk in net.blocks] == [False, False, True]
    x, t, cond = inputs()
    want = mmdit_reference(net, x, t, cond.labels)
    torch.testing.assert_close(net(x, t, cond), want, rtol=1e-9, atol=1e-9)


def test_mmdit_init_follows_dit_rules_for_both_streams():
    # The forward reference randomises every weight, so it cannot see the init. SD3 inherits
    # DiT's: adaLN-Zero for the image AND the context stream (every residual branch and the
    # output start at zero), N(0, 0.02) label tables and timestep MLP, fixed sin-cos positions,
    # xavier-uniform transformer linears with zero biases.
    from dit_bench.backbones.layers import sincos_pos_embed_2d

    net = mmdit(qk_norm=True)
    d, grid = net.pos_embed.shape[-1], net.x_embedder.grid_size
    assert not net.pos_embed.requires_grad
    torch.testing.assert_close(net.pos_embed[0], sincos_pos_embed_2d(d, grid), rtol=0, atol=0)
    zeroed = [net.final_layer.linear, net.final_layer.adaLN_modulation[1]]
    for blk in net.blocks:
        zeroed += [blk.adaLN_modulation[1], blk.context_adaLN_modulation[1]]
    for layer in zeroed:
        assert not layer.weight.any() and not layer.bias.any()
    small = [net.y_context.embedding_table, net.y_pooled.embedding_table]
    small += [net.t_embedder.mlp[0], net.t_embedder.mlp[2]]
    for layer in small:
        assert layer.weight.std().item() == pytest.approx(0.02, rel=0.25)
    zero_ids = {id(m) for m in zeroed + small}
    for name, m in net.named_modules():
        if isinstance(m, torch.nn.Linear) and id(m) not in zero_ids:
            w = m.weight
            bound = math.sqrt(6 / (w.shape[0] + w.shape[1]))  # xavier-uniform
            assert not m.bias.any(), name
            assert 0 < w.abs().max() <= bound, name
    x, t, cond = inputs()
    assert not net(x.float(), t.float(), cond).any()  # zero output at init
