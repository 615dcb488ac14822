"""The contract every backbone keeps, run over every registered family and conditioning scheme.

Tiny configs on the CPU; every preset is also built on the meta device (shapes and counts only).
Paper numbers checked here: ADM-256 (554M params, 1120 Gflops), U-ViT (S 44M ... H 501M,
H/2 133 Gflops), DiT Fig. 5 (XL/2 cross-attention 137.6, in-context 119.4, adaLN 118.6 Gflops).
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import io
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from dit_bench.backbones import (
    BACKBONES,
    CONDITIONINGS,
    FAMILIES,
    GEOMETRY,
    PRESETS,
    Cond,
    build_backbone,
    geometry_errors,
    resolve_preset,
)
from dit_bench.fast import compile_backbone

# family -> tiny explicit sizes (8x8 inputs, 3 channels, 5 classes)
TINY = {
    "dit": dict(depth=2, hidden_size=32, num_heads=4, patch_size=2),
    "mmdit": dict(depth=2, hidden_size=32, num_heads=4, patch_size=2),
    "unet": dict(
        depth=1, hidden_size=32, channel_mult=(1, 2), attention_ds=(1, 2), head_channels=16
    ),
    "uvit": dict(depth=3, hidden_size=32, num_heads=4, patch_size=2, conv=True),
}
CASES = [(f, c, {}) for f in BACKBONES for c in CONDITIONINGS[f]]
CASES.append(("mmdit", "joint_attn", {"qk_norm": True}))
IDS = [f"{f}-{c}" + ("-qk" if kw else "") for f, c, kw in CASES]
# Families that read Cond.context and Cond.pooled; every other family must refuse them.
READS_TEXT = {"mmdit"}
# Families whose design zero-initialises the output layer (DiT for every scheme, as its code).
ZERO_AT_INIT = {"dit", "mmdit", "unet"}
SIZE, C, N_CLASSES = 8, 3, 5

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(family, conditioning, extra=None, learn_sigma=True, seed=0):
    torch.manual_seed(seed)
    if family not in TINY:  # a new family in the registry: these per-family tests cover it
        pytest.fail(f"family {family!r} has no tiny sizes: add its entry to TINY in {__file__}")
    kw = TINY[family] | (extra or {})
    return BACKBONES[family](
        image_size=SIZE,
        in_channels=C,
        num_classes=N_CLASSES,
        conditioning=conditioning,
        learn_sigma=learn_sigma,
        **kw,
    )


def randomise(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> None:
    """Every weight random (the zero-initialised ones too), so every path carries signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


def inputs(b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, C, SIZE, SIZE, generator=g)
    t = torch.rand(b, generator=g) * 1000
    y = torch.tensor([0, 4, N_CLASSES])[:b]  # the last one is the null class
    return x, t, Cond(labels=y)


@pytest.fixture(params=CASES, ids=IDS)
def case(request):
    return request.param


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_output_shape_and_attributes(case, learn_sigma):
    family, cond, extra = case
    net = tiny(family, cond, extra, learn_sigma=learn_sigma)
    out = net(*inputs())
    c_out = 2 * C if learn_sigma else C
    assert out.shape == (3, c_out, SIZE, SIZE)
    assert (net.in_channels, net.out_channels, net.num_classes, net.image_size) == (
        C,
        c_out,
        N_CLASSES,
        SIZE,
    )
    assert net.learn_sigma is learn_sigma and net.conditioning == cond
    assert net.num_tokens > 0
    assert 0 < net.num_params(trainable_only=True) <= net.num_params()


def test_deterministic_under_a_seed(case):
    a, b = tiny(*case, seed=7), tiny(*case, seed=7)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb), ka
    randomise(a)
    args = inputs()
    torch.testing.assert_close(a(*args), a(*args), rtol=0, atol=0)
    a.train()  # no dropout or label dropout inside a backbone
    out_train = a(*args)
    a.eval()
    torch.testing.assert_close(a(*args), out_train, rtol=0, atol=0)


def test_every_trainable_parameter_gets_a_gradient(case):
    # With the zero-inits most gradients are exactly zero at init (a zero gate blocks its
    # branch), so randomise every weight first: this checks that each parameter is wired in.
    net = tiny(*case)
    randomise(net)
    net(*inputs()).square().mean().backward()
    for name, p in net.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


@pytest.mark.parametrize(
    "case", [pytest.param(c, id=i) for c, i in zip(CASES, IDS, strict=True) if c[0] != "unet"]
)
def test_token_stream_enters_every_block_contiguous(case):
    # A token-minor (transposed) stream survives every residual add (elementwise ops keep their
    # first operand's layout) and makes each LayerNorm and linear copy it: 2-6% of a CPU step.
    net = tiny(*case)
    seen = []

    def check(module, args):
        tokens = [a for a in args if isinstance(a, torch.Tensor) and a.dim() == 3]
        seen.append((type(module).__name__, [a.is_contiguous() for a in tokens]))

    for m in net.modules():
        if type(m).__name__.endswith("Block"):
            m.register_forward_pre_hook(check)
    net(*inputs())
    assert seen, "no block ran"
    for name, flags in seen:  # each block gets tokens, and every token tensor is contiguous
        assert flags and all(flags), (name, flags)


def test_training_from_the_real_init_reaches_every_parameter(case):
    # ... and from the real init, a few optimiser steps move every trainable parameter: the
    # zero-initialised layers open up first, then the branches behind them (in a 2-block MMDiT
    # the first block's context stream sits behind three zero layers: its own gate, the next
    # block's image gate and the final linear).
    net = tiny(*case)
    before = {k: p.detach().clone() for k, p in net.named_parameters() if p.requires_grad}
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    x, t, cond = inputs()
    target = torch.randn_like(net(x, t, cond))
    for _ in range(5):
        opt.zero_grad()
        (net(x, t, cond) - target).square().mean().backward()
        opt.step()
    for name, p in net.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p.detach(), before[name]), name


def test_zero_output_at_init_where_the_design_zero_inits(case):
    family = case[0]
    out = tiny(*case)(*inputs())
    if family in ZERO_AT_INIT:
        assert torch.count_nonzero(out) == 0
    else:  # U-ViT initialises everything trunc-normal: no zero output layer
        assert out.abs().max() > 0


def test_state_dict_round_trip(case):
    src = tiny(*case, seed=1)
    randomise(src, seed=3)
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    dst = tiny(*case, seed=2)
    dst.load_state_dict(torch.load(buf, weights_only=True))
    args = inputs()
    torch.testing.assert_close(dst(*args), src(*args), rtol=0, atol=0)


def test_null_label_and_unconditional(case):
    net = tiny(*case)
    randomise(net)
    x, t, _ = inputs()
    null = torch.full((3,), N_CLASSES)
    out_null = net(x, t, Cond(labels=null))
    assert torch.isfinite(out_null).all()
    torch.testing.assert_close(net(x, t, Cond()), out_null)  # no labels = the null class
    real = net(x, t, Cond(labels=torch.zeros(3, dtype=torch.long)))
    assert not torch.allclose(real, out_null)


@pytest.mark.parametrize("field", ["context", "pooled"])
def test_context_and_pooled_are_read_or_refused(case, field):
    # A label-only backbone handed text tokens must say so, not train a label-only model.
    family = case[0]
    net = tiny(*case)
    randomise(net)
    x, t, cond = inputs()
    d = TINY[family]["hidden_size"]
    text = torch.randn(3, 5, d) if field == "context" else torch.randn(3, d)
    given = dataclasses.replace(cond, **{field: text})
    if family in READS_TEXT:
        assert not torch.allclose(net(x, t, given), net(x, t, cond))
    else:
        # a family added later names itself as it likes
        name = {"dit": "DiT", "unet": "U-Net", "uvit": "U-ViT"}.get(family, r"\S+")
        with pytest.raises(ValueError, match=rf"^{name}\b.*cond\.{field}.*MMDiT"):
            net(x, t, given)


def test_analytic_macs_equal_flop_counter(case):
    # FlopCounterMode counts 2 x MACs of matmuls, convolutions and SDPA. torch 2.14's fused CPU
    # SDPA kernel has no counting rule, so force the math backend (two counted bmm's).
    net = tiny(*case)
    randomise(net)
    b = 2
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        net(*inputs(b))
    assert counter.get_total_flops() == net.flops(batch=b)["flops"]
    assert net.flops(batch=b)["macs"] * 2 == net.flops(batch=b)["flops"]


def test_forward_in_float64(case):
    net = tiny(*case).double()
    randomise(net)
    x, t, cond = inputs()
    out = net(x.double(), t.double(), cond)
    assert out.dtype == torch.float64 and torch.isfinite(out).all()


@pytest.mark.parametrize("h,w", [(4, 16), (9, 9), (4, 4), (16, 16)])
@pytest.mark.parametrize(
    "patch_case", [c for c in CASES if c[0] != "unet"], ids=[i for i in IDS if "unet" not in i]
)
def test_patch_transformers_refuse_other_input_sizes(patch_case, h, w):
    """The position table and unpatchify fit image_size x image_size only: a 4x16 input has the
    same token count and a 9x9 one the same grid after the conv, and both used to come back
    8x8. (The U-Net is convolutional, with no position table: other sizes run.)"""
    net = tiny(*patch_case)
    x, t, y = inputs()
    with pytest.raises(ValueError, match=rf"input is {h}x{w} .*built for {SIZE}x{SIZE}"):
        net(torch.randn(3, C, h, w), t, y)


@pytest.mark.slow
def test_torch_compile_matches_eager(case):
    net = tiny(*case)
    randomise(net)
    args = inputs()
    compiled = compile_backbone(copy.deepcopy(net))  # as training compiles: regional or whole
    torch.testing.assert_close(compiled(*args), net(*args), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_torch_compile_one_config():
    """One compile on the default scheme (about a minute of Inductor on 2 CPU cores)."""
    net = tiny("dit", "adaln_zero")
    randomise(net)
    args = inputs()
    torch.testing.assert_close(torch.compile(net)(*args), net(*args), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Registry and presets
# ---------------------------------------------------------------------------------------------


def test_registry_is_consistent():
    # from the registry: a new family in it must not fail this test
    assert set(BACKBONES) == set(CONDITIONINGS) == set(GEOMETRY) == set(FAMILIES)
    assert {"dit", "mmdit", "unet", "uvit"} <= set(FAMILIES)
    assert {p["family"] for p in PRESETS.values()} == set(BACKBONES)
    for name, preset in PRESETS.items():
        assert isinstance(preset, dict) and preset["family"] in BACKBONES, name


def _natural_input(name):
    if name == "unet-adm256":
        return 256, 3
    if name == "unet-adm64":
        return 64, 3
    return 32, 4


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_and_counts(name):
    size, ch = _natural_input(name)
    family = PRESETS[name]["family"]
    for conditioning in CONDITIONINGS[family]:
        with torch.device("meta"):
            net = build_backbone(
                name,
                image_size=size,
                in_channels=ch,
                num_classes=1000,
                conditioning=conditioning,
                learn_sigma=True,
            )
            out = net(torch.zeros(2, ch, size, size), torch.zeros(2), Cond())
        assert out.shape == (2, 2 * ch, size, size)
        f = net.flops()
        assert f["macs"] > 0 and f["flops"] == 2 * f["macs"]
        assert net.flops(batch=3)["macs"] == 3 * f["macs"]


def meta(name, learn_sigma=True, **kw):
    size, ch = _natural_input(name)
    with torch.device("meta"):
        return build_backbone(
            name, image_size=size, in_channels=ch, num_classes=1000, learn_sigma=learn_sigma, **kw
        )


def test_adm_imagenet_presets_match_the_paper():
    # ADM ImageNet 256 (class-conditional, learned sigma): 554M parameters [ADM], 1120 Gflops
    # [DiT Table 4]; ImageNet 64: 296M. Our label table has one more row (the null class).
    adm256 = meta("unet-adm256")
    assert adm256.num_params() == pytest.approx(554e6, rel=2e-3)
    assert adm256.flops()["macs"] / 1e9 == pytest.approx(1120, rel=2e-3)
    assert meta("unet-adm64").num_params() == pytest.approx(296e6, rel=2e-3)
    # Head width and the attention resolutions (32, 16, 8 px) change neither count: as ADM's.
    for name, side in (("unet-adm64", 64), ("unet-adm256", 256)):
        assert PRESETS[name]["head_channels"] == 64, name
        assert sorted(PRESETS[name]["attention_ds"]) == [side // 32, side // 16, side // 8]


def test_uvit_presets_match_the_paper():
    # U-ViT Table 1 / 2: S 44M, M 131M, L 287M, H 501M; U-ViT-H/2 on 32x32x4 latents 133 Gflops.
    # (U-ViT's latent models predict eps only: learn_sigma off.)
    want = {"s": 44e6, "m": 131e6, "l": 287e6, "h": 501e6}
    for size, params in want.items():
        net = meta(f"uvit-{size}/2", learn_sigma=False)
        # S is the paper's CIFAR-10 model (no label table): 2% slack for our 1000-class one
        assert net.num_params() == pytest.approx(params, rel=2e-2), size
    h2 = meta("uvit-h/2", learn_sigma=False)
    assert h2.flops()["macs"] / 1e9 == pytest.approx(133, abs=0.5)
    # Head counts and the pixel-space conv change neither count: U-ViT Table 1 (and its
    # configs: conv on for the pixel-space S and M, off for the latent L and H), spelled out.
    table = {"s": (13, 512, 8, True), "m": (17, 768, 12, True)}
    table |= {"l": (21, 1024, 16, False), "h": (29, 1152, 16, False)}
    for size, (depth, width, heads, conv) in table.items():
        for patch in (2, 4):
            got = {k: v for k, v in PRESETS[f"uvit-{size}/{patch}"].items() if k != "family"}
            want = dict(depth=depth, hidden_size=width, num_heads=heads, patch_size=patch)
            assert got == dict(want, conv=conv), size


def test_dit_conditioning_schemes_match_figure_5():
    # DiT Fig. 5 (XL/2): adaLN-Zero 118.6, adaLN 118.6, cross-attention 137.6, in-context 119.4.
    want = {"adaln_zero": 118.6, "adaln": 118.6, "cross_attn": 137.6, "in_context": 119.4}
    got = {c: meta("dit-xl/2", conditioning=c).flops()["macs"] / 1e9 for c in want}
    for c in want:
        assert got[c] == pytest.approx(want[c], abs=0.1), c
    assert got["cross_attn"] / got["adaln_zero"] == pytest.approx(1.16, abs=0.01)  # ~15% more


def test_mmdit_presets_follow_the_sd3_rule():
    for name, p in PRESETS.items():
        if p["family"] == "mmdit":
            assert p["hidden_size"] == 64 * p["depth"] and p["num_heads"] == p["depth"], name
    assert {"mmdit-d4/2", "mmdit-d6/2", "mmdit-d24/2"} <= set(PRESETS)
    # SD3-medium-like d24 at 32x32x4: about 2B parameters.
    assert meta("mmdit-d24/2").num_params() == pytest.approx(2.03e9, rel=1e-2)


def test_overrides_apply_only_where_the_preset_has_the_key():
    assert resolve_preset("unet-s", depth=3)["depth"] == 3
    assert resolve_preset("mmdit-d4/2", qk_norm=True)["qk_norm"] is True
    with pytest.raises(ValueError, match=r"patch_size=2 does not apply to 'unet' presets"):
        resolve_preset("unet-s", patch_size=2)
    with pytest.raises(ValueError, match="qk_norm=True does not apply to 'dit'"):
        resolve_preset("dit-s/2", qk_norm=True)
    with pytest.raises(ValueError, match="qk_norm must be true or false"):
        resolve_preset("mmdit-d4/2", qk_norm=1)
    net = build_backbone("mmdit-d2/4", image_size=8, in_channels=3, num_classes=2, qk_norm=True)
    assert net.blocks[0].qk_norm


def test_geometry_errors_name_the_key():
    kw = dict(in_channels=3, num_classes=10)
    with pytest.raises(ValueError, match="not divisible by 4"):
        build_backbone("unet-xs", image_size=6, **kw)
    with pytest.raises(ValueError, match="hidden_size=48 must be a multiple of 32"):
        build_backbone("unet-xs", image_size=8, hidden_size=48, **kw)
    with pytest.raises(ValueError, match="depth=6 must be odd"):
        build_backbone("uvit-xs/2", image_size=8, depth=6, **kw)
    with pytest.raises(ValueError, match="num_heads=3 must divide hidden_size=128"):
        build_backbone("mmdit-d2/2", image_size=8, num_heads=3, **kw)
    with pytest.raises(ValueError, match="allowed: \\['adagn'\\]"):
        build_backbone("unet-xs", image_size=8, conditioning="adaln_zero", **kw)


def test_uvit_width_needs_no_sincos_multiple_of_4():
    # U-ViT learns its positions, so only num_heads | hidden_size applies to its width; DiT and
    # MMDiT keep 4 | hidden_size for their fixed 2-D sin-cos table.
    kw = dict(image_size=SIZE, in_channels=C, num_classes=N_CLASSES)
    net = build_backbone("uvit-xs/2", depth=3, hidden_size=30, num_heads=3, **kw)
    out = net(*inputs())
    assert out.shape == (3, C, SIZE, SIZE) and torch.isfinite(out).all()
    assert geometry_errors(resolve_preset("uvit-xs/2", hidden_size=30, num_heads=3), 8) == []
    for name in ("dit-xs/2", "mmdit-d2/2"):
        with pytest.raises(ValueError, match=r"hidden_size=30 must be a multiple of 4"):
            build_backbone(name, hidden_size=30, num_heads=3, **kw)


def test_unet_geometry_errors_name_the_size_and_preset_keys():
    spec = resolve_preset("unet-xs")  # channel_mult (1, 2, 2): halves the size twice
    (err,) = geometry_errors(spec, 10, prefix="backbone.")
    assert err.startswith("data.image_size=10 is not divisible by 4: the U-Net preset ")
    assert "(backbone.name) has channel_mult=(1, 2, 2)" in err
    with pytest.raises(ValueError, match=r"^image_size=6 is not divisible by 4: .*\(name\)"):
        build_backbone("unet-xs", image_size=6, in_channels=3, num_classes=10)
    (err,) = geometry_errors(dict(spec, attention_ds=(3,)), 8, prefix="backbone.")
    assert err == (
        "attention_ds=3 of the U-Net preset (backbone.name) is not one of its downsampling "
        "factors [1, 2, 4]"
    )


def test_families_import_shared_pieces_from_layers_not_from_each_other():
    # A change to one family must not silently change another: the shared pieces live in
    # layers.py, and no family module imports another family module.
    families = set(BACKBONES)
    root = Path(__file__).parents[1] / "dit_bench" / "backbones"
    for family in families:
        tree = ast.parse((root / f"{family}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                tail = node.module.rsplit(".", 1)[-1]
                names = {a.name for a in node.names}
                assert tail not in families, (family, node.module)
                if node.module == "dit_bench.backbones":
                    assert not names & families, (family, names)


# ---------------------------------------------------------------------------------------------
# DiT schemes against explicit formulas
# ---------------------------------------------------------------------------------------------


def _ln(z, weight=None, bias=None):
    mu = z.mean(-1, keepdim=True)
    out = (z - mu) / torch.sqrt(((z - mu) ** 2).mean(-1, keepdim=True) + 1e-6)
    return out if weight is None else out * weight + bias


def _attend(q, k, v, heads):
    """Multi-head softmax(Q K^T / sqrt(d)) V with a loop over heads."""
    dh = q.shape[-1] // heads
    outs = []
    for h in range(heads):
        sl = slice(h * dh, (h + 1) * dh)
        s = q[..., sl] @ k[..., sl].transpose(1, 2) / dh**0.5
        outs.append(torch.softmax(s, dim=-1) @ v[..., sl])
    return torch.cat(outs, -1)


def test_cross_attention_block_equals_explicit_reference():
    from dit_bench.backbones.dit import CrossAttnBlock

    torch.manual_seed(0)
    blk = CrossAttnBlock(24, 3).double()
    randomise(blk)
    x = torch.randn(2, 7, 24, dtype=torch.float64)
    t, y = torch.randn(2, 24, dtype=torch.float64), torch.randn(2, 24, dtype=torch.float64)
    _, c = CrossAttnBlock.condition(x, t, y)
    assert c.shape == (2, 2, 24)

    def lin(layer, z):
        return z @ layer.weight.T + layer.bias

    def self_attn(z):
        q, k, v = lin(blk.attn.qkv, z).split(24, -1)
        return lin(blk.attn.proj, _attend(q, k, v, 3))

    def cross(z):
        q = lin(blk.cross_attn.q, z)
        k, v = lin(blk.cross_attn.kv, c).split(24, -1)
        return lin(blk.cross_attn.proj, _attend(q, k, v, 3))

    h = x + self_attn(_ln(x, blk.norm1.weight, blk.norm1.bias))
    h = h + cross(_ln(h, blk.norm_cross.weight, blk.norm_cross.bias))
    m = _ln(h, blk.norm2.weight, blk.norm2.bias)
    h = h + lin(blk.mlp.fc2, torch.nn.functional.gelu(lin(blk.mlp.fc1, m), approximate="tanh"))
    torch.testing.assert_close(blk(x, c), h, rtol=0, atol=1e-12)


def test_adaln_block_equals_explicit_modulation():
    from dit_bench.backbones.dit import AdaLNBlock

    torch.manual_seed(0)
    blk = AdaLNBlock(16, 2).double()
    randomise(blk)
    x, c = torch.randn(2, 5, 16, dtype=torch.float64), torch.randn(2, 16, dtype=torch.float64)
    w, b = blk.adaLN_modulation[1].weight, blk.adaLN_modulation[1].bias
    want = []
    for i in range(2):  # per sample, explicit: gamma, beta regressed from c; no gates
        mods = (c[i] * torch.sigmoid(c[i])) @ w.T + b
        shift1, scale1, shift2, scale2 = mods.split(16)
        h = x[i : i + 1]
        h = h + blk.attn(_ln(h) * (1 + scale1) + shift1)
        h = h + blk.mlp(_ln(h) * (1 + scale2) + shift2)
        want.append(h)
    torch.testing.assert_close(blk(x, c), torch.cat(want), rtol=0, atol=1e-12)


def test_in_context_tokens_are_removed_before_the_final_layer():
    net = tiny("dit", "in_context")
    randomise(net)
    assert net.num_tokens == net.x_embedder.num_patches + 2
    assert not net.final_layer.adaptive and net.final_layer.norm_final.elementwise_affine
    seen = {}

    def record(module, args):
        seen["shape"] = args[0].shape

    net.final_layer.register_forward_pre_hook(record)
    net(*inputs())
    assert seen["shape"] == (3, net.x_embedder.num_patches, 32)
    # adaLN-style schemes keep the adaptive final norm
    assert tiny("dit", "adaln").final_layer.adaptive


def test_the_registry_is_built_from_each_family_s_record():
    # A new family is its file (ending in FAMILY = Family(...)) and one entry in FAMILIES: the
    # config's scheme check, presets and geometry all come from there.
    from dit_bench.backbones import FAMILIES

    names = [n for f in FAMILIES.values() for n in f.presets]
    assert len(names) == len(set(names)) == len(PRESETS)  # no preset name in two families
    for key, family in FAMILIES.items():
        assert key == family.name and BACKBONES[key] is family.model
        assert (
            CONDITIONINGS[key] == family.conditionings and GEOMETRY[key] is family.geometry_errors
        )
        assert all(p["family"] == key for p in family.presets.values())
