"""The extension promise: a backbone family defined outside the package (here, in this file)
joins through `register_family` and runs through config, train, resume, sample and bench
with nothing else edited; a clash or a missing interface member is refused up front."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dit_bench import backbones
from dit_bench.backbones import Cond, build_backbone, register_family
from dit_bench.backbones.family import Family
from dit_bench.backbones.layers import (
    LabelEmbedder,
    PatchEmbed,
    TimestepEmbedder,
    refuse_unread_context,
    unpatchify,
)
from dit_bench.bench import BenchConfig, run_bench
from dit_bench.cli import main
from dit_bench.config import build_config
from dit_bench.train.run import train

pytestmark = pytest.mark.usefixtures("one_thread")


class MixerBlock(nn.Module):
    """MLP-Mixer block (Tolstikhin et al. 2021) with a scale from the conditioning vector."""

    def __init__(self, tokens: int, d: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False)
        self.token_mlp = nn.Linear(tokens, tokens)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False)
        self.channel_mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.ada = nn.Linear(d, 2 * d)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        s1, s2 = self.ada(c)[:, None].chunk(2, dim=-1)  # (B, 1, D) each
        x = x + self.token_mlp((self.norm1(x) * (1 + s1)).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mlp(self.norm2(x) * (1 + s2))  # (B, T, D)

    def macs(self, t: int, d: int) -> int:
        return d * t * t + t * 4 * d * d + 2 * d * d


class UncountedMixer(nn.Module):
    """A small MLP-Mixer diffusion backbone, all of the interface but the FLOP count."""

    def __init__(
        self,
        *,
        image_size,
        in_channels,
        num_classes,
        depth,
        hidden_size,
        patch_size,
        conditioning="adaln",
        learn_sigma=False,
    ):
        super().__init__()
        self.image_size, self.in_channels, self.num_classes = image_size, in_channels, num_classes
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.learn_sigma, self.conditioning, self.patch_size = learn_sigma, conditioning, patch_size
        d = hidden_size
        self.patch_embed = PatchEmbed(image_size, patch_size, in_channels, d)
        self.t_emb = TimestepEmbedder(d)
        self.y_emb = LabelEmbedder(num_classes, d)
        self.blocks = nn.ModuleList(
            MixerBlock(self.patch_embed.num_patches, d) for _ in range(depth)
        )
        self.out = nn.Linear(d, patch_size * patch_size * self.out_channels)

    @property
    def num_tokens(self) -> int:
        return self.patch_embed.num_patches

    def forward(self, x, timesteps, cond: Cond):
        refuse_unread_context(cond, "Mixer", "cond.labels")
        h = self.patch_embed(x)  # (B, T, D)
        c = self.t_emb(timesteps) + self.y_emb(cond.labels, x.shape[0])  # (B, D)
        for block in self.blocks:
            h = block(h, c)
        return unpatchify(self.out(h), self.patch_size, self.out_channels)

    def num_params(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


class Mixer(UncountedMixer):
    def flops(self, batch: int = 1) -> dict[str, int]:
        t, d = self.num_tokens, self.out.in_features
        macs = self.patch_embed.macs() + self.t_emb.macs()
        macs += sum(b.macs(t, d) for b in self.blocks) + t * d * self.out.out_features
        return {"macs": batch * macs, "flops": 2 * batch * macs}


def mixer_geometry(spec: dict, image_size: int, prefix: str = "") -> list[str]:
    if image_size % spec["patch_size"]:
        return [f"{prefix}patch_size={spec['patch_size']} must divide {image_size}"]
    return []


MIXER = Family(
    "mixer",
    Mixer,
    ("adaln",),
    {"mixer-t/2": dict(family="mixer", depth=2, hidden_size=16, patch_size=2)},
    mixer_geometry,
)
VIEWS = ("FAMILIES", "BACKBONES", "CONDITIONINGS", "GEOMETRY", "PRESETS")


@pytest.fixture
def registry():
    """The registry as it is now, put back afterwards (registration fills it in place)."""
    before = {v: dict(getattr(backbones, v)) for v in VIEWS}
    yield
    for v in VIEWS:
        view = getattr(backbones, v)
        view.clear()
        view.update(before[v])


TINY = [
    "experiment=mixer",
    "data.name=digits",
    "backbone.name=mixer-t/2",
    "train.batch_size=4",
    "train.log_every=1",
    "train.val_every=2",
    "train.checkpoint_every=2",
    "train.threads=1",
    "eval.val_images=8",
    "eval.val_levels=2",
    "eval.samples_per_class=1",
    "eval.sample_steps=2",
]


def test_a_family_registered_outside_the_package_trains_resumes_samples_and_benches(
    registry, tmp_path
):
    register_family(MIXER)
    cfg = build_config(None, [*TINY, "train.steps=2"])
    assert cfg.backbone.conditioning == "adaln"  # the family's own, with nothing else edited
    first = train(cfg, tmp_path, progress=False)
    # another step budget is another run; the same config again resumes (and finds it done)
    assert train(cfg, tmp_path, progress=False) == first
    s = json.loads((first / "summary.json").read_text())
    net = build_backbone("mixer-t/2", image_size=8, in_channels=1, num_classes=10)
    assert (s["family"], s["conditioning"], s["tokens"]) == ("mixer", "adaln", 16)
    assert s["macs"] == net.flops()["macs"] > 0 and s["params"] == net.num_params()
    with FlopCounterMode(display=False) as counter:  # the analytic count is the true one
        net(torch.zeros(1, 1, 8, 8), torch.zeros(1), Cond(labels=torch.zeros(1, dtype=torch.long)))
    assert counter.get_total_flops() == net.flops()["flops"]
    grid = tmp_path / "grid.png"
    assert main(["sample", str(first), "--n", "2", "--steps", "2", "-o", str(grid)]) == 0
    assert grid.stat().st_size > 0
    bench = BenchConfig(
        backbones=("mixer-t/2",), image_size=8, channels=1, batch=2, num_classes=10,
        warmup=1, repeats=1, sample=False, device="cpu", learn_sigma=False,
    )  # fmt: skip
    (row,) = run_bench(bench)["rows"]
    assert row["backbone"] == "mixer-t/2" and row["tokens"] == 16
    # the FLOP/s come from the family's own analytic count
    assert row["fwd_gflops_per_img"] == pytest.approx(net.flops()["flops"] / 1e9)


def test_register_family_refuses_clashes(registry):
    register_family(MIXER)
    with pytest.raises(ValueError, match="'mixer' is already registered"):
        register_family(MIXER)
    # a copied dit.py keeping DiT's preset names would take over every dit-* run
    copy = dataclasses.replace(
        MIXER, name="mixer2", presets={"dit-s/2": dict(MIXER.presets["mixer-t/2"])}
    )
    with pytest.raises(ValueError, match="'dit-s/2' has family='mixer'"):
        register_family(copy)
    copy = dataclasses.replace(copy, presets={"dit-s/2": dict(family="mixer2", depth=1)})
    with pytest.raises(ValueError, match="'dit-s/2' is already a 'dit' preset"):
        register_family(copy)
    assert backbones.PRESETS["dit-s/2"]["family"] == "dit"
    assert "mixer2" not in backbones.FAMILIES  # a refused family leaves nothing behind


def test_a_backbone_without_the_interface_is_refused_when_built(monkeypatch):
    # Written against the views alone, as any registration fills them: a net without flops()
    # used to train to the last step and then fail writing summary.json.
    monkeypatch.setitem(backbones.BACKBONES, "noflops", UncountedMixer)
    monkeypatch.setitem(backbones.CONDITIONINGS, "noflops", ("adaln",))
    monkeypatch.setitem(backbones.GEOMETRY, "noflops", mixer_geometry)
    spec = dict(family="noflops", depth=1, hidden_size=16, patch_size=2)
    monkeypatch.setitem(backbones.PRESETS, "noflops-t/2", spec)
    with pytest.raises(TypeError, match=r"UncountedMixer \(family 'noflops'\) lacks flops"):
        build_backbone("noflops-t/2", image_size=8, in_channels=1, num_classes=10)


def test_config_choices_come_from_the_registries():
    # A sampler or objective added to its registry is a valid config value without a second
    # list to edit; an objective's config fields are exactly its constructor's arguments.
    from typing import get_args

    from dit_bench.config import OBJECTIVE_CONFIGS, EvalConfig
    from dit_bench.objectives import OBJECTIVES, build_objective
    from dit_bench.sampling import SAMPLERS

    assert get_args(EvalConfig.model_fields["sampler"].annotation) == tuple(SAMPLERS)
    assert set(OBJECTIVE_CONFIGS) == set(OBJECTIVES)
    for name, config in OBJECTIVE_CONFIGS.items():
        kwargs = config().model_dump()
        assert type(build_objective(kwargs.pop("name"), **kwargs)) is OBJECTIVES[name]
        assert type(build_config(None, [f"objective.name={name}"]).objective) is config


class ShortApiObjective:
    """An objective written to DESIGN's short API: loss(net, x0, cond) without batch_slice,
    and no VAL_LEVELS. It trained nothing: the run died at its first step."""

    def loss(self, net, x0, cond, *, generator=None):
        return {"loss": x0.flatten(1).mean(1)}

    def val_loss(self, net, x0, cond, *, seed=0, levels=4):
        return {"loss": x0.mean(), "per_level": x0.mean().repeat(levels)}

    def sample(self, net, noise, cond, **options):
        return noise


def test_an_objective_without_the_harness_interface_is_refused_when_built(monkeypatch):
    from dit_bench import objectives

    monkeypatch.setitem(objectives.OBJECTIVES, "short", ShortApiObjective)
    with pytest.raises(TypeError, match="'short'.*VAL_LEVELS; loss\\(\\) keywords batch_slice"):
        objectives.build_objective("short")
    assert objectives.interface_errors(objectives.OBJECTIVES["ddpm"]) == []


def test_the_objective_registries_name_what_one_of_them_lacks():
    # a line in OBJECTIVES alone read as an unknown objective ("must be one of 'ddpm', 'flow'")
    from dit_bench.config import OBJECTIVE_CONFIGS, FlowConfig, objective_registry_errors
    from dit_bench.objectives import OBJECTIVES

    (err,) = objective_registry_errors(OBJECTIVE_CONFIGS, {**OBJECTIVES, "edm": object})
    assert "'edm' is in objectives.OBJECTIVES but has no config class" in err
    (err,) = objective_registry_errors({**OBJECTIVE_CONFIGS, "uflow": FlowConfig}, OBJECTIVES)
    assert "'uflow' is in config.OBJECTIVE_CONFIGS but not in objectives.OBJECTIVES" in err
    (err,) = objective_registry_errors({"ddpm": FlowConfig}, {"ddpm": OBJECTIVES["ddpm"]})
    assert "config fields density, logit_mean" in err and "not keyword arguments of DDPM" in err
