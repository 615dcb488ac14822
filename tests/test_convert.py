"""Import of facebookresearch/DiT weights: parity with a slow reference in DiT's layout.

`RefDiT` below is written for this test in the module layout and key names of
facebookresearch/DiT `models.py` (timm-style PatchEmbed / Attention / Mlp), with explicit
softmax attention and a loop-based timestep embedding, so parity checks the math, not a copy.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dit_bench.backbones import Cond, build_backbone
from dit_bench.backbones.convert import dit_from_original

# Tiny models run in-process outside train() (which sets train.threads): on one thread, as
# train() runs them; on two shared cores OpenMP's barriers cost more than the second thread
# saves (conftest's one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")

# ---------------------------------------------------------------------------------------------
# Slow reference, facebookresearch/DiT layout
# ---------------------------------------------------------------------------------------------


class RefPatchEmbed(nn.Module):
    def __init__(self, c, d, p):
        super().__init__()
        self.proj = nn.Conv2d(c, d, p, p)


class RefTimestep(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(256, d), nn.SiLU(), nn.Linear(d, d))

    def forward(self, t):
        rows = []
        for tb in t.tolist():
            args = [tb * 10000 ** (-i / 128) for i in range(128)]
            rows.append([math.cos(a) for a in args] + [math.sin(a) for a in args])
        return self.mlp(torch.tensor(rows, dtype=self.mlp[0].weight.dtype))


class RefLabel(nn.Module):
    def __init__(self, n, d):
        super().__init__()
        self.embedding_table = nn.Embedding(n + 1, d)  # DiT with dropout > 0: extra null row


class RefAttention(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.h = h
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1) * (d // self.h) ** -0.5).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, d))


class RefMlp(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x):
        return self.fc2(nn.functional.gelu(self.fc1(x), approximate="tanh"))


def ref_modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class RefBlock(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn = RefAttention(d, h)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.mlp = RefMlp(d)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))

    def forward(self, x, c):
        sa, sc, ga, sm, scm, gm = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + ga.unsqueeze(1) * self.attn(ref_modulate(self.norm1(x), sa, sc))
        return x + gm.unsqueeze(1) * self.mlp(ref_modulate(self.norm2(x), sm, scm))


class RefFinal(nn.Module):
    def __init__(self, d, p, c_out):
        super().__init__()
        self.norm_final = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(d, p * p * c_out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(ref_modulate(self.norm_final(x), shift, scale))


class RefDiT(nn.Module):
    def __init__(self, size=8, p=2, c=3, d=32, depth=2, h=4, n=5, learn_sigma=True):
        super().__init__()
        self.p, self.c_out = p, 2 * c if learn_sigma else c
        self.x_embedder = RefPatchEmbed(c, d, p)
        self.t_embedder = RefTimestep(d)
        self.y_embedder = RefLabel(n, d)
        self.pos_embed = nn.Parameter(torch.zeros(1, (size // p) ** 2, d), requires_grad=False)
        self.blocks = nn.ModuleList(RefBlock(d, h) for _ in range(depth))
        self.final_layer = RefFinal(d, p, self.c_out)

    def forward(self, x, t, y):
        x = self.x_embedder.proj(x).flatten(2).transpose(1, 2) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder.embedding_table(y)
        for block in self.blocks:
            x = block(x, c)
        x = self.final_layer(x, c)
        g, p = int(x.shape[1] ** 0.5), self.p
        x = x.reshape(x.shape[0], g, g, p, p, self.c_out)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], self.c_out, g * p, g * p)


def random_ref(seed=0, **kw) -> RefDiT:
    """A float64 reference with EVERY tensor random, zero-initialised ones and pos_embed too."""
    torch.manual_seed(seed)
    ref = RefDiT(**kw).double()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.2)
    return ref


# ---------------------------------------------------------------------------------------------
# Parity
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_converted_model_matches_reference(learn_sigma):
    ref = random_ref(learn_sigma=learn_sigma)
    net = dit_from_original(ref.state_dict(), num_heads=4)
    assert (net.image_size, net.in_channels, net.num_classes) == (8, 3, 5)
    assert net.learn_sigma is learn_sigma and len(net.blocks) == 2
    assert net.out_channels == (6 if learn_sigma else 3)
    assert net.pos_embed.dtype == torch.float64 and not net.pos_embed.requires_grad

    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([0.0, 3.0, 500.5, 999.0], dtype=torch.float64)
    y = torch.tensor([0, 4, 5, 2])  # 5 = null class
    with torch.no_grad():
        want = ref(x, t, y)
        got = net(x, t, Cond(labels=y))
    assert want.abs().max() > 1e-2  # not a trivial 0 == 0
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_converted_model_owns_its_tensors():
    ref = random_ref()
    sd = ref.state_dict()
    net = dit_from_original(sd, num_heads=4)
    before = net.final_layer.linear.weight.clone()
    sd["final_layer.linear.weight"].zero_()
    torch.testing.assert_close(net.final_layer.linear.weight, before)


def test_paper_width_infers_heads_and_training_checkpoint_uses_ema():
    ref = random_ref(d=384, depth=1, h=6, n=2, size=4)
    net = dit_from_original({"model": {}, "ema": ref.state_dict()})
    assert net.blocks[0].attn.num_heads == 6 and net.num_classes == 2


def test_xl2_checkpoint_shapes_on_meta():
    with torch.device("meta"):
        src = build_backbone(
            "dit-xl/2", image_size=32, in_channels=4, num_classes=1000, learn_sigma=True
        )
    net = dit_from_original(src.state_dict())  # a released DiT-XL-2-256x256.pt has these keys
    assert (net.image_size, net.in_channels, net.num_classes, net.learn_sigma) == (
        32,
        4,
        1000,
        True,
    )
    assert net.blocks[0].attn.num_heads == 16 and len(net.blocks) == 28
    assert net.num_params() == 675_129_632


# ---------------------------------------------------------------------------------------------
# Errors on bad state dicts
# ---------------------------------------------------------------------------------------------


def test_unknown_width_needs_num_heads():
    with pytest.raises(ValueError, match="pass num_heads"):
        dit_from_original(random_ref().state_dict())


def test_missing_and_unexpected_keys():
    sd = random_ref().state_dict()
    del sd["blocks.1.mlp.fc2.bias"]
    sd["blocks.0.attn.q_norm.weight"] = torch.ones(8)
    with pytest.raises(ValueError, match=r"missing keys \['blocks.1.mlp.fc2.bias'\]") as err:
        dit_from_original(sd, num_heads=4)
    assert "blocks.0.attn.q_norm.weight" in str(err.value)


def test_not_a_dit_state_dict():
    with pytest.raises(ValueError, match="missing key 'x_embedder.proj.weight'"):
        dit_from_original({"conv.weight": torch.zeros(1)})


def test_wrong_shape():
    sd = random_ref().state_dict()
    sd["blocks.0.mlp.fc1.weight"] = torch.zeros(100, 32, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"blocks.0.mlp.fc1.weight: got \(100, 32\)"):
        dit_from_original(sd, num_heads=4)


def test_non_contiguous_blocks():
    sd = random_ref(depth=3).state_dict()
    sd = {k: v for k, v in sd.items() if not k.startswith("blocks.1.")}
    with pytest.raises(ValueError, match="not contiguous"):
        dit_from_original(sd, num_heads=4)


def test_bad_geometry():
    sd = random_ref().state_dict()
    bad = dict(sd, pos_embed=torch.zeros(1, 15, 32, dtype=torch.float64))
    with pytest.raises(ValueError, match="not a square grid"):
        dit_from_original(bad, num_heads=4)
    bad = dict(sd, **{"final_layer.linear.weight": torch.zeros(20, 32, dtype=torch.float64)})
    with pytest.raises(ValueError, match="final_layer.linear emits 20"):
        dit_from_original(bad, num_heads=4)
