"""DiT backbone: math of the shared layers, DiT's invariants, presets, params and MACs.

Big presets are built on the meta device (shapes and counts, no memory, no init cost).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from dit_bench.backbones import (
    BACKBONES,
    CONDITIONINGS,
    PRESETS,
    Cond,
    build_backbone,
    resolve_preset,
)
from dit_bench.backbones.dit import DiT
from dit_bench.backbones.layers import (
    Attention,
    Mlp,
    PatchEmbed,
    modulate,
    sincos_pos_embed_2d,
    timestep_embedding,
    unpatchify,
)

# Tiny models run in-process outside train() (which sets train.threads): on one thread, as
# train() runs them; on two shared cores OpenMP's barriers cost more than the second thread
# saves (conftest's one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(depth=2, hidden_size=32, num_heads=4, patch_size=2)


def tiny(**kw) -> DiT:
    args = dict(image_size=8, in_channels=3, num_classes=5) | TINY | kw
    return DiT(**args)


def randomise(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> None:
    """Overwrite every weight, the zero-initialised ones included, so outputs are non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


def inputs(b: int = 3, c: int = 3, size: int = 8, num_classes: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, size, size, generator=g)
    t = torch.rand(b, generator=g) * 1000
    y = torch.randint(0, num_classes + 1, (b,), generator=g)
    return x, t, Cond(labels=y)


# ---------------------------------------------------------------------------------------------
# Shared layers against slow explicit references
# ---------------------------------------------------------------------------------------------


def test_modulate_formula():
    x, shift, scale = torch.randn(2, 5, 4), torch.randn(2, 4), torch.randn(2, 4)
    want = torch.stack([x[i] * (1 + scale[i]) + shift[i] for i in range(2)])
    torch.testing.assert_close(modulate(x, shift, scale), want)


def test_timestep_embedding_explicit_formula():
    t = torch.tensor([0.0, 1.0, 17.5, 999.0], dtype=torch.float64)
    dim, half = 10, 5
    want = torch.zeros(4, dim, dtype=torch.float64)
    for b in range(4):
        for i in range(half):
            freq = 10000 ** (-i / half)
            want[b, i] = math.cos(t[b].item() * freq)  # cos first, as DiT
            want[b, half + i] = math.sin(t[b].item() * freq)
    torch.testing.assert_close(timestep_embedding(t, dim), want, rtol=0, atol=1e-12)
    # odd width pads one zero column; float32 input is computed in float32
    odd = timestep_embedding(t.float(), dim + 1)
    assert odd.dtype == torch.float32 and odd.shape == (4, dim + 1)
    assert torch.all(odd[:, -1] == 0)
    torch.testing.assert_close(odd[:, :dim].double(), want, rtol=0, atol=1e-3)


def test_attention_equals_explicit_softmax_reference():
    torch.manual_seed(0)
    attn = Attention(hidden_size=24, num_heads=3).double()
    x = torch.randn(2, 7, 24, dtype=torch.float64)
    q, k, v = attn.qkv(x).split(24, dim=-1)  # (B, T, D) each; heads are contiguous D/H slices
    heads = []
    for h in range(3):
        sl = slice(8 * h, 8 * (h + 1))
        scores = q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(8)  # (B, T, T)
        heads.append(torch.softmax(scores, dim=-1) @ v[..., sl])  # (B, T, 8)
    want = attn.proj(torch.cat(heads, dim=-1))
    torch.testing.assert_close(attn(x), want, rtol=0, atol=1e-12)


def test_sincos_table_equals_mae_numpy_code():
    # MAE / DiT get_2d_sincos_pos_embed, transcribed in numpy.
    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    dim, g = 16, 5
    grid = np.stack(np.meshgrid(np.arange(g, dtype=np.float32), np.arange(g, dtype=np.float32)))
    want = np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)
    torch.testing.assert_close(sincos_pos_embed_2d(dim, g), torch.from_numpy(want).float())


def test_unpatchify_inverts_patchify():
    p, c = 2, 3
    x = torch.randn(2, c, 8, 8)
    tokens = x.reshape(2, c, 4, p, 4, p).permute(0, 2, 4, 3, 5, 1).reshape(2, 16, p * p * c)
    torch.testing.assert_close(unpatchify(tokens, p, c), x)


def test_patch_embed_is_a_linear_map_of_each_patch():
    pe = PatchEmbed(image_size=8, patch_size=4, in_channels=2, hidden_size=6).double()
    x = torch.randn(1, 2, 8, 8, dtype=torch.float64)
    w = pe.proj.weight.reshape(6, -1)
    patch = x[0, :, 4:8, 0:4].reshape(-1)  # token 2: second row, first column (row-major)
    torch.testing.assert_close(pe(x)[0, 2], w @ patch + pe.proj.bias)


def test_mlp_gelu_is_tanh_by_default_and_exact_on_request():
    # DiT/SD3 use the tanh approximation, U-ViT the exact erf GELU: 0.5 z (1 + erf(z / sqrt 2))
    z = torch.linspace(-4, 4, 101, dtype=torch.float64)
    exact = 0.5 * z * (1 + torch.erf(z / math.sqrt(2)))
    tanh = 0.5 * z * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)))
    torch.testing.assert_close(Mlp(4).act(z), tanh, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(Mlp(4, approximate="none").act(z), exact, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="approximate"):
        Mlp(4, approximate="erf")


# ---------------------------------------------------------------------------------------------
# DiT behaviour
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_output_exactly_zero_at_init_and_channels(learn_sigma):
    torch.manual_seed(0)
    net = tiny(learn_sigma=learn_sigma)
    out = net(*inputs())
    assert out.shape == (3, 6 if learn_sigma else 3, 8, 8)
    assert net.out_channels == out.shape[1] and net.learn_sigma is learn_sigma
    assert torch.count_nonzero(out) == 0


def test_pos_embed_frozen_and_counted():
    net = tiny()
    assert not net.pos_embed.requires_grad
    torch.testing.assert_close(net.pos_embed[0], sincos_pos_embed_2d(32, 4))
    assert net.num_params() - net.num_params(trainable_only=True) == 16 * 32


def test_null_label_and_unconditional():
    torch.manual_seed(0)
    net = tiny()
    randomise(net)
    x, t, _ = inputs()
    null = torch.full((3,), net.num_classes)
    out_null = net(x, t, Cond(labels=null))
    assert torch.isfinite(out_null).all()
    torch.testing.assert_close(net(x, t, Cond()), out_null)  # no labels = null class
    assert not torch.allclose(net(x, t, Cond(labels=torch.zeros(3, dtype=torch.long))), out_null)
    assert net.y_embedder.embedding_table.num_embeddings == net.num_classes + 1


def test_no_label_dropout_in_train_mode():
    torch.manual_seed(0)
    net = tiny()
    randomise(net)
    args = inputs()
    net.eval()
    a = net(*args)
    net.train()
    torch.testing.assert_close(net(*args), a, rtol=0, atol=0)


def test_every_parameter_gets_a_gradient():
    net = tiny(learn_sigma=True)
    randomise(net)
    net(*inputs()).square().mean().backward()
    for name, p in net.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_same_seed_same_weights():
    torch.manual_seed(123)
    a = build_backbone("dit-xs/4", image_size=16, in_channels=3, num_classes=10)
    torch.manual_seed(123)
    b = build_backbone("dit-xs/4", image_size=16, in_channels=3, num_classes=10)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb), ka


def test_float64_and_timestep_scale():
    net = tiny().double()
    randomise(net)
    x, t, cond = inputs()
    out = net(x.double(), t.double(), cond)
    assert out.dtype == torch.float64
    # DDPM passes integer step indices as floats; any float in 0..1000 works
    assert torch.isfinite(net(x.double(), torch.tensor([0.0, 999.0, 1000.0]).double(), cond)).all()


# ---------------------------------------------------------------------------------------------
# Presets and registry
# ---------------------------------------------------------------------------------------------


def test_preset_ladder():
    sizes = {"xs": (4, 128, 4), "ti": (6, 192, 3), "s": (12, 384, 6), "b": (12, 768, 12)}
    sizes |= {"l": (24, 1024, 16), "xl": (28, 1152, 16)}
    want = {
        f"dit-{s}/{p}": dict(family="dit", depth=d, hidden_size=w, num_heads=h, patch_size=p)
        for s, (d, w, h) in sizes.items()
        for p in (2, 4, 8)
    }
    assert {k: v for k, v in PRESETS.items() if v["family"] == "dit"} == want
    assert {"dit", "mmdit", "unet", "uvit"} <= set(BACKBONES) == set(CONDITIONINGS)
    assert CONDITIONINGS["dit"] == ("adaln_zero", "adaln", "cross_attn", "in_context")


@pytest.mark.parametrize("name", sorted(k for k, v in PRESETS.items() if v["family"] == "dit"))
def test_every_preset_output_shape(name):
    big = PRESETS[name]["hidden_size"] > 192
    with torch.device("meta" if big else "cpu"):
        net = build_backbone(name, image_size=16, in_channels=4, num_classes=10, learn_sigma=True)
        x, t = torch.randn(2, 4, 16, 16), torch.rand(2) * 1000
        out = net(x, t, Cond(labels=torch.tensor([3, 10])))
    assert out.shape == (2, 8, 16, 16)
    assert (net.in_channels, net.out_channels, net.num_classes, net.image_size) == (4, 8, 10, 16)


def test_resolve_preset_overrides_and_errors():
    assert resolve_preset("dit-s/2") == PRESETS["dit-s/2"]
    r = resolve_preset("dit-s/2", depth=3, patch_size=4)
    assert r == dict(family="dit", depth=3, hidden_size=384, num_heads=6, patch_size=4)
    assert PRESETS["dit-s/2"]["depth"] == 12  # not mutated
    with pytest.raises(ValueError, match="dit-xl/2"):  # lists the known names
        resolve_preset("dit-q/2")
    with pytest.raises(ValueError, match="depth"):
        resolve_preset("dit-s/2", depth=0)


def test_build_backbone_errors_name_the_allowed_values():
    kw = dict(image_size=16, in_channels=3, num_classes=10)
    with pytest.raises(ValueError, match="known presets"):
        build_backbone("unet-q", **kw)
    with pytest.raises(ValueError, match="adaln_zero"):
        build_backbone("dit-xs/2", conditioning="joint_attn", **kw)
    with pytest.raises(ValueError, match="patch_size=3 must divide the image size 16"):
        build_backbone("dit-xs/2", patch_size=3, **kw)
    with pytest.raises(ValueError, match="num_heads=5 must divide hidden_size=128"):
        build_backbone("dit-xs/2", num_heads=5, **kw)
    net = build_backbone("dit-xs/2", depth=1, hidden_size=64, num_heads=2, patch_size=4, **kw)
    assert len(net.blocks) == 1 and net.x_embedder.num_patches == 16


# ---------------------------------------------------------------------------------------------
# Parameter and MAC counts against the paper
# ---------------------------------------------------------------------------------------------


def test_dit_xl2_parameter_count():
    with torch.device("meta"):
        net = build_backbone(
            "dit-xl/2", image_size=32, in_channels=4, num_classes=1000, learn_sigma=True
        )
    assert net.num_params() == 675_129_632
    assert net.num_params(trainable_only=True) == 674_834_720


# DiT Table 4 "Gflops" (multiply-adds), 256x256 images = 32x32x4 latents, 1000 classes.
PAPER_GMACS = {
    "s/8": 0.36, "s/4": 1.41, "s/2": 6.06, "b/8": 1.42, "b/4": 5.56, "b/2": 23.01,
    "l/8": 5.01, "l/4": 19.70, "l/2": 80.71, "xl/8": 7.39, "xl/4": 29.05, "xl/2": 118.64,
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(PAPER_GMACS))
def test_paper_gflops(name):
    with torch.device("meta"):
        net = build_backbone(
            f"dit-{name}", image_size=32, in_channels=4, num_classes=1000, learn_sigma=True
        )
    f = net.flops()
    assert f["macs"] / 1e9 == pytest.approx(PAPER_GMACS[name], abs=0.1)
    assert f["flops"] == 2 * f["macs"]
    assert net.flops(batch=3)["macs"] == 3 * f["macs"]


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_analytic_macs_equal_flop_counter(learn_sigma):
    # FlopCounterMode counts 2 * MACs of matmuls, convs and SDPA; neither side counts elementwise
    # ops. The fused CPU SDPA kernel has no rule in FlopCounterMode, so force the math backend,
    # which decomposes into two counted bmm's: Q K^T and attn @ V.
    net = tiny(learn_sigma=learn_sigma, image_size=12, hidden_size=48, num_heads=3)
    randomise(net)
    b = 2
    x, t, cond = inputs(b=b, size=12)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        net(x, t, cond)
    assert counter.get_total_flops() == net.flops(batch=b)["flops"]


def test_flop_counter_sees_sdpa_on_a_bare_attention():
    q = torch.randn(2, 3, 16, 8)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        F.scaled_dot_product_attention(q, q, q)
    assert counter.get_total_flops() == 2 * (2 * 2 * 3 * 16 * 16 * 8)  # 2 matmuls, 2 flops/MAC
