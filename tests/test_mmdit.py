"""MMDiT: joint attention against an explicit softmax reference, and parity with diffusers' SD3.

The parity test builds a tiny random `SD3Transformer2DModel` (diffusers is a test-only
dependency), converts its state dict and compares outputs in float64.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dit_bench.backbones import Cond
from dit_bench.backbones.convert import mmdit_from_diffusers
from dit_bench.backbones.mmdit import MMDiT, MMDiTBlock

pytestmark = pytest.mark.usefixtures("one_thread")


def randomise(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


# ---------------------------------------------------------------------------------------------
# One block against explicit formulas
# ---------------------------------------------------------------------------------------------


def explicit_block(blk: MMDiTBlock, x, ctx, y):
    """SD3 Fig. 2b written out: modulations as formulas, attention as an explicit softmax."""
    d, heads = x.shape[-1], blk.num_heads
    dh = d // heads

    def ln(z):
        mu = z.mean(-1, keepdim=True)
        var = ((z - mu) ** 2).mean(-1, keepdim=True)
        return (z - mu) / torch.sqrt(var + 1e-6)

    def rms(z, w):
        return z / torch.sqrt((z**2).mean(-1, keepdim=True) + 1e-6) * w

    def lin(layer, z):
        return z @ layer.weight.T + layer.bias

    def mlp(m, z):
        return lin(m.fc2, F.gelu(lin(m.fc1, z), approximate="tanh"))

    silu_y = y * torch.sigmoid(y)
    mx = lin(blk.adaLN_modulation[1], silu_y).chunk(6, dim=1)
    mc = lin(blk.context_adaLN_modulation[1], silu_y).chunk(6 if not blk.context_pre_only else 2, 1)
    hx = ln(x) * (1 + mx[1][:, None]) + mx[0][:, None]
    hc = ln(ctx) * (1 + mc[1][:, None]) + mc[0][:, None]
    qx, kx, vx = lin(blk.qkv, hx).split(d, -1)
    if blk.context_pre_only:
        kc, vc = lin(blk.context_kv, hc).split(d, -1)
        qc = None
    else:
        qc, kc, vc = lin(blk.context_qkv, hc).split(d, -1)
    outs_x, outs_c = [], []
    t = x.shape[1]
    for h in range(heads):
        sl = slice(h * dh, (h + 1) * dh)
        q_parts = [qx[..., sl]] + ([qc[..., sl]] if qc is not None else [])
        k_parts, v_parts = [kx[..., sl], kc[..., sl]], [vx[..., sl], vc[..., sl]]
        if blk.qk_norm:
            q_parts[0] = rms(q_parts[0], blk.q_norm.weight)
            if qc is not None:
                q_parts[1] = rms(q_parts[1], blk.context_q_norm.weight)
            k_parts = [
                rms(k_parts[0], blk.k_norm.weight),
                rms(k_parts[1], blk.context_k_norm.weight),
            ]
        q, k, v = torch.cat(q_parts, 1), torch.cat(k_parts, 1), torch.cat(v_parts, 1)
        a = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(dh), dim=-1) @ v
        outs_x.append(a[:, :t])
        outs_c.append(a[:, t:])
    ox, oc = torch.cat(outs_x, -1), torch.cat(outs_c, -1)
    x = x + mx[2][:, None] * lin(blk.proj, ox)
    x = x + mx[5][:, None] * mlp(blk.mlp, ln(x) * (1 + mx[4][:, None]) + mx[3][:, None])
    if blk.context_pre_only:
        return x, None
    ctx = ctx + mc[2][:, None] * lin(blk.context_proj, oc)
    ctx = ctx + mc[5][:, None] * mlp(
        blk.context_mlp, ln(ctx) * (1 + mc[4][:, None]) + mc[3][:, None]
    )
    return x, ctx


@pytest.mark.parametrize("pre_only", [False, True])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_block_equals_explicit_joint_attention(pre_only, qk_norm):
    torch.manual_seed(0)
    blk = MMDiTBlock(24, 3, qk_norm=qk_norm, context_pre_only=pre_only).double()
    randomise(blk)
    x = torch.randn(2, 7, 24, dtype=torch.float64)
    ctx = torch.randn(2, 5, 24, dtype=torch.float64)
    y = torch.randn(2, 24, dtype=torch.float64)
    got_x, got_c = blk(x, ctx, y)
    want_x, want_c = explicit_block(blk, x, ctx, y)
    torch.testing.assert_close(got_x, want_x, rtol=0, atol=1e-12)
    if pre_only:
        assert got_c is None
    else:
        torch.testing.assert_close(got_c, want_c, rtol=0, atol=1e-12)


def test_external_context_and_pooled_replace_the_label_ones():
    torch.manual_seed(0)
    net = MMDiT(
        image_size=8, in_channels=3, num_classes=4, depth=2, hidden_size=32, num_heads=2,
        patch_size=2, context_dim=12, pooled_dim=10, context_tokens=3,
    )  # fmt: skip
    randomise(net)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10.0, 900.0])
    labels = torch.tensor([1, 4])
    ctx_lab = net.y_context(labels, 2).reshape(2, 3, 12)
    pooled_lab = net.y_pooled(labels, 2)
    base = net(x, t, Cond(labels=labels))
    torch.testing.assert_close(net(x, t, Cond(context=ctx_lab, pooled=pooled_lab)), base)
    ctx = torch.randn(2, 9, 12)  # any number of context tokens
    out = net(x, t, Cond(labels=labels, context=ctx))
    assert out.shape == base.shape and not torch.allclose(out, base)
    assert net.flops(context_tokens=9)["macs"] > net.flops()["macs"]


# ---------------------------------------------------------------------------------------------
# Parity with diffusers' SD3Transformer2DModel
# ---------------------------------------------------------------------------------------------


def _timesteps_float64(ref):
    """diffusers computes the sinusoid in float32 (Timesteps / get_timestep_embedding); for an
    exact float64 comparison give it the same [cos | sin] formula in float64."""
    from dit_bench.backbones.layers import timestep_embedding

    ref.time_text_embed.time_proj.forward = lambda t: timestep_embedding(t.double(), 256)


@pytest.mark.parametrize(
    "qk_norm,out_channels,image_size",
    [(None, 4, 8), ("rms_norm", 4, 8), (None, 8, 6)],
    ids=["plain", "qk-rmsnorm", "learn-sigma-cropped-pos"],
)
def test_matches_diffusers_sd3_in_float64(qk_norm, out_channels, image_size):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ref = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16,
        pooled_projection_dim=10, out_channels=out_channels, pos_embed_max_size=5, qk_norm=qk_norm,
    ).double().eval()  # fmt: skip
    randomise(ref)
    _timesteps_float64(ref)
    net = mmdit_from_diffusers(ref.state_dict(), image_size=image_size, num_heads=2)
    assert (net.in_channels, net.out_channels, len(net.blocks)) == (4, out_channels, 3)
    assert net.blocks[-1].context_pre_only and net.blocks[0].qk_norm == (qk_norm is not None)

    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, image_size, image_size, generator=g, dtype=torch.float64)
    ctx = torch.randn(3, 6, 12, generator=g, dtype=torch.float64)
    pooled = torch.randn(3, 10, generator=g, dtype=torch.float64)
    t = torch.tensor([0.0, 250.5, 999.0], dtype=torch.float64)
    with torch.no_grad():
        want = ref(x, ctx, pooled, t).sample
        got = net(x, t, Cond(context=ctx, pooled=pooled))
    assert want.abs().max() > 1e-2
    # diffusers' RMSNorm takes the mean square in float32 even for float64 inputs.
    atol = 1e-5 if qk_norm else 1e-10
    torch.testing.assert_close(got, want, rtol=0, atol=atol)


def test_diffusers_float32_end_to_end():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ref = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16,
        pooled_projection_dim=10, out_channels=4, pos_embed_max_size=4,
    ).eval()  # fmt: skip
    randomise(ref, std=0.1)
    net = mmdit_from_diffusers(ref.state_dict(), image_size=8, num_heads=2)
    x, ctx, pooled = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 12), torch.randn(2, 10)
    t = torch.tensor([3.0, 700.0])
    with torch.no_grad():
        want = ref(x, ctx, pooled, t).sample
        got = net(x, t, Cond(context=ctx, pooled=pooled))
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


def test_converter_rejects_foreign_state_dicts():
    with pytest.raises(ValueError, match="missing 'pos_embed.proj.weight'"):
        mmdit_from_diffusers({"x": torch.zeros(1)}, image_size=8)
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16,
        pooled_projection_dim=10, out_channels=4, pos_embed_max_size=4,
    )  # fmt: skip
    sd = ref.state_dict()
    with pytest.raises(ValueError, match="pass num_heads"):
        mmdit_from_diffusers(sd, image_size=8)
    with pytest.raises(ValueError, match="at most 4 patches per side"):
        mmdit_from_diffusers(sd, image_size=10, num_heads=2)
    with pytest.raises(ValueError, match="unexpected keys"):
        mmdit_from_diffusers(
            dict(sd, **{"extra.weight": torch.zeros(1)}), image_size=8, num_heads=2
        )
    # a truncated file: the missing tensor is named (was a bare KeyError mid-mapping)
    cut = {k: v for k, v in sd.items() if k != "transformer_blocks.1.ff.net.2.bias"}
    with pytest.raises(ValueError, match="missing key 'transformer_blocks.1.ff.net.2.bias'"):
        mmdit_from_diffusers(cut, image_size=8, num_heads=2)
    qk = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16,
        pooled_projection_dim=10, out_channels=4, pos_embed_max_size=4, qk_norm="rms_norm",
    ).state_dict()  # fmt: skip
    with pytest.raises(ValueError, match="num_heads=4: the QK-norm weights give 2 heads"):
        mmdit_from_diffusers(qk, image_size=8, num_heads=4)
