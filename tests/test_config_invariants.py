"""Config invariants a hand mutation audit of dit_bench/config.py found unguarded.

Each test pins one rule of the config against values worked out here: a boundary on both
sides (the value just allowed and the value just refused), a refusal for every case the rule
names, or a run-directory hash recorded from an earlier version (a changed hash orphans every
run made before it: nothing is skipped or resumed). All of it builds configs only: ~1 s.
"""

import re

import pytest

from dit_bench.config import (
    DEFAULT_EXPERIMENT,
    ConfigError,
    build_config,
    load_config,
    parse_override,
)


def error(overrides: list[str], raw: dict | None = None) -> str:
    with pytest.raises(ConfigError) as e:
        build_config(raw, overrides)
    return str(e.value)


# -- run-directory hashes ---------------------------------------------------------------------
def test_hashes_of_existing_runs_do_not_move():
    """Run directories are named by the hash: a hash that moves (a default changed, a key now
    hashed that was not, another digest length) makes every run made before unreachable, so
    finished runs train again and interrupted ones start over. Values recorded from this
    version; change them only with a deliberate, announced migration."""
    # (the config types' defaults, a DDPM run, are pinned in test_precision.py)
    assert load_config().hash == "82d0cce65d"  # the demo experiment (`make demo`): flow
    tiny = build_config(None, ["data.name=digits", "backbone.name=dit-xs/4", "seed=7"])
    assert tiny.hash == "f59c73abf9"
    assert re.fullmatch(r"[0-9a-f]{10}", tiny.hash)
    # A size override written out is hashed as written, even where it equals the preset (a
    # sweep's patch-4 trials of a /4 base, ablations/backbones.yaml's uvit width): hashing it
    # as null would build the same net, but move those runs' directories
    spelled = build_config(None, ["data.name=digits", "backbone.name=dit-xs/4", "seed=7",
                                  "backbone.patch_size=4"])  # fmt: skip
    assert spelled.hash == "46065bf4a9" != tiny.hash


def test_a_folder_split_by_name_is_a_run_of_its_own_and_positional_runs_keep_their_hash(
    tmp_path,
):
    """data.split_by came after folder runs were made: left at "position" it is not hashed (those
    runs keep their directories and resume on the same split); "name" splits other images, so
    it names a directory of its own. The built-in sets have no file names to split by."""
    folder = ["data.name=folder", f"data.root={tmp_path}", "data.image_size=8"]
    positional = build_config(None, folder)
    assert build_config(None, [*folder, "data.split_by=position"]).hash == positional.hash
    assert build_config(None, [*folder, "data.split_by=name"]).hash != positional.hash
    assert "data.split_by applies to data.name=folder only, not digits" in error(
        ["data.name=digits", "data.split_by=name"]
    )


# -- build_config does not touch its input ----------------------------------------------------
def test_a_true_float32_run_is_a_run_of_its_own_and_tf32_runs_keep_their_hash():
    """TF32 matmuls change a float32 GPU run's numbers beyond rounding: tf32=false with
    32-true names its own directory; the default (TF32 on) keeps its. A bf16-mixed run does
    not: hashing it now would leave its earlier runs' directories behind (README)."""
    fp32 = build_config(None, ["train.precision=32-true"])
    assert build_config(None, ["train.precision=32-true", "train.tf32=true"]).hash == fp32.hash
    assert build_config(None, ["train.precision=32-true", "train.tf32=false"]).hash != fp32.hash
    bf16 = build_config(None, ["train.precision=bf16-mixed"])
    assert build_config(None, ["train.precision=bf16-mixed", "train.tf32=false"]).hash == bf16.hash
    assert load_config().hash == "82d0cce65d"  # the pinned hash above, TF32 left at its default


def test_overrides_do_not_leak_into_the_raw_config_or_the_demo():
    """An ablation builds every variant from one `base` mapping, and `dit-bench train` with no
    file from DEFAULT_EXPERIMENT: a variant's key written into either would reach every later
    run of the process."""
    raw = {"train": {"steps": 7}, "backbone": {"name": "dit-xs/4"}}
    build_config(raw, ["train.steps=3", "train.batch_size=8", "backbone.conditioning=adaln"])
    assert raw == {"train": {"steps": 7}, "backbone": {"name": "dit-xs/4"}}
    assert build_config(raw).train.steps == 7 and build_config(raw).train.batch_size == 64
    demo_steps = DEFAULT_EXPERIMENT["train"]["steps"]
    assert load_config(None, ["train.steps=5"]).train.steps == 5
    assert load_config().train.steps == demo_steps == 2000
    assert "conditioning" in DEFAULT_EXPERIMENT["backbone"]
    load_config(None, ["backbone.name=unet-xs"])  # switches families: drops adaln_zero
    assert load_config().backbone.conditioning == "adaln_zero"


def test_override_values_may_hold_an_equals_sign():
    assert parse_override("data.root=/data/a=b") == (["data", "root"], "/data/a=b")
    assert parse_override("experiment=x") == (["experiment"], "x")


def test_an_empty_config_file_is_the_config_types_defaults(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(empty).hash == build_config({}).hash


# -- data -------------------------------------------------------------------------------------
def test_folder_data_needs_an_image_size_as_well_as_a_root(tmp_path):
    msg = error(["data.name=folder", f"data.root={tmp_path}"])
    assert "data.name=folder needs data.root and data.image_size" in msg
    ok = build_config(None, ["data.name=folder", f"data.root={tmp_path}", "data.image_size=8"])
    assert ok.data.image_size == 8


def test_a_vae_is_refused_for_every_data_set_but_latents(tmp_path):
    folder = ["data.name=folder", f"data.root={tmp_path}", "data.image_size=8"]
    for base in (folder, ["data.name=shapes"], ["data.name=digits"]):
        name = base[0].split("=")[1]
        assert f"data.vae applies to data.name=latents only, not {name}" in error(
            [*base, "data.vae=/vae"]
        )


def test_latents_needs_a_root_naming_the_command_that_makes_one():
    assert "data.name=latents needs data.root (an encode-latents folder)" in error(
        ["data.name=latents"]
    )


def test_an_in_training_fd_on_latents_needs_the_vae_that_decodes_them(latents_root):
    # the FD scores decoded images: without data.vae it failed at its first evaluation
    latents = ["data.name=latents", f"data.root={latents_root}", "backbone.patch_size=2"]
    assert "eval.fd_every on latents needs data.vae" in error([*latents, "eval.fd_every=3"])
    assert build_config(None, latents).eval.fd_every == 0


def test_geometry_is_checked_at_the_configured_image_size_not_the_native_one():
    # digits are 8x8 natively; resized to 12, a 6-pixel patch fits and an 8-pixel one does not
    ok = build_config(None, ["data.name=digits", "data.image_size=12", "backbone.patch_size=6"])
    assert ok.backbone.spec()["patch_size"] == 6
    assert "backbone.patch_size=8 must divide the image size 12" in error(
        ["data.name=digits", "data.image_size=12", "backbone.patch_size=8"]
    )


# -- objectives -------------------------------------------------------------------------------
def test_linear_ddpm_schedule_boundary_is_twenty_steps():
    # the last linear beta is 0.02 * 1000 / T: 1.0 at T = 20 (alpha_bar 0), below 1 at T = 21
    assert 0.02 * 1000 / 21 < 1 <= 0.02 * 1000 / 20
    ddpm = ["objective.name=ddpm", "eval.sample_steps=10"]
    assert build_config(None, [*ddpm, "objective.num_timesteps=21"]).objective.num_timesteps == 21
    assert "needs more than 20" in error([*ddpm, "objective.num_timesteps=20"])
    cosine = [*ddpm, "objective.schedule=cosine", "objective.num_timesteps=10"]
    assert build_config(None, cosine).objective.num_timesteps == 10  # clipped: any T > 1


@pytest.mark.parametrize(
    "density, key, value, owner",
    [
        ("mode", "logit_std", 2.0, "logit_normal"),
        ("uniform", "logit_std", 0.5, "logit_normal"),
        ("mode", "logit_mean", 0.5, "logit_normal"),
        ("logit_normal", "mode_scale", 1.0, "mode"),
        ("uniform", "mode_scale", 0.0, "mode"),
    ],
)
def test_a_flow_density_parameter_is_refused_under_another_density(density, key, value, owner):
    flow = ["objective.name=flow", "eval.sampler=euler"]
    msg = error([*flow, f"objective.density={density}", f"objective.{key}={value}"])
    assert f"objective.{key} applies to objective.density={owner} only" in msg
    ok = build_config(None, [*flow, f"objective.density={owner}", f"objective.{key}={value}"])
    assert getattr(ok.objective, key) == value


# -- eval -------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler", ["ddpm", "euler", "heun", "euler_maruyama"])
def test_eta_is_refused_for_every_sampler_but_ddim(sampler):
    objective = "ddpm" if sampler == "ddpm" else "flow"
    base = [f"objective.name={objective}", f"eval.sampler={sampler}"]
    assert build_config(None, base).eval.sampler == sampler
    assert f"eval.eta applies to eval.sampler=ddim only (got {sampler})" in error(
        [*base, "eval.eta=0.5"]
    )


def test_guidance_interval_bounds_are_the_net_timesteps_0_to_1000():
    # every step a level of the grid: an interval between two levels is refused on its own
    every = ["eval.sample_steps=1000"]
    for lo, hi in ((0, 1000), (500, 500), (0, 0)):
        assert build_config(
            None, [*every, f"eval.cfg_interval=[{lo}, {hi}]"]
        ).eval.cfg_interval == (lo, hi)
    for lo, hi in ((0, 1001), (600, 500), (-1, 10)):
        assert "0 <= lo <= hi <= 1000" in error([f"eval.cfg_interval=[{lo}, {hi}]"])


def test_guidance_interval_reaches_ddpm_timesteps_past_1000():
    """The interval is in net timesteps, 0..T-1 for DDPM: with T = 4000 (iDDPM's) the top
    steps must be reachable (a fixed bound of 1000 refused [2000, 3999] and left [0, 1000]
    guiding the least noisy quarter of the chain only)."""
    guided = [
        "objective.name=ddpm",
        "eval.sampler=ddpm",
        "eval.cfg_scale=3",
        "train.label_dropout=0.1",
        "objective.num_timesteps=4000",
    ]
    cfg = build_config(None, [*guided, "eval.cfg_interval=[2000,3999]"])
    assert cfg.eval.cfg_interval == (2000, 3999)
    assert "0 <= lo <= hi <= 3999" in error([*guided, "eval.cfg_interval=[0,4000]"])


@pytest.mark.parametrize("scale", [0, 0.5, 3.0])
def test_any_guidance_scale_but_one_needs_a_trained_null_class(scale):
    # guided = uncond + s (cond - uncond): every s != 1 weighs the null-class prediction in
    msg = error([f"eval.cfg_scale={scale}", "train.label_dropout=0"])
    assert "which train.label_dropout=0 never trains" in msg
    assert build_config(None, [f"eval.cfg_scale={scale}"]).eval.cfg_scale == scale


def test_guided_channels_may_be_all_of_the_data_s_channels_but_no_more():
    assert build_config(None, ["eval.cfg_channels=1"]).eval.cfg_channels == 1  # mnist: grey
    shapes = ["data.name=shapes"]  # RGB
    assert build_config(None, [*shapes, "eval.cfg_channels=3"]).eval.cfg_channels == 3
    assert "eval.cfg_channels=4: the data has 3 channel(s)" in error(
        [*shapes, "eval.cfg_channels=4"]
    )


# -- train ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "devices, nodes, batch, ok",
    [
        (1, 3, 8, False),  # 3 processes
        (2, 2, 6, False),  # 4 processes
        (2, 2, 8, True),
        (1, 4, 8, True),
        (3, 1, 9, True),
    ],
)
def test_the_global_batch_splits_over_every_process_of_every_node(devices, nodes, batch, ok):
    sets = [f"train.devices={devices}", f"train.num_nodes={nodes}", f"train.batch_size={batch}"]
    if ok:
        assert build_config(None, sets).train.batch_size == batch
    else:
        assert f"train.devices x train.num_nodes = {devices * nodes} processes" in error(sets)


def test_a_bf16_stream_is_refused_under_fp16_mixed_precision_too():
    # test_precision.py covers the default 32-true; 16-mixed is half precision, not bf16
    msg = error(["train.precision=16-mixed", "train.bf16_stream=true"])
    assert "train.bf16_stream needs train.precision=bf16-mixed (got '16-mixed')" in msg


def test_activation_checkpointing_is_an_execution_key_and_refused_with_cudagraphs():
    # the same numbers (tests/test_fast_paths.py): the run directory of the run without it
    tiny = ["data.name=digits", "backbone.name=dit-xs/4", "seed=7"]
    assert build_config(None, [*tiny, "train.activation_checkpointing=true"]).hash == "f59c73abf9"
    for family in ("dit-xs/4", "mmdit-d2/2", "uvit-xs/2", "unet-xs"):  # every backbone has blocks
        build_config(None, [f"backbone.name={family}", "train.activation_checkpointing=true"])
    graphs = ["train.compile=true", "train.cudagraphs=true"]
    build_config(None, graphs)
    msg = error([*graphs, "train.activation_checkpointing=true"])
    assert "train.cudagraphs with train.activation_checkpointing: not verified on a GPU" in msg
    # every k-th block: also an execution key, and only with checkpointing on
    every = ["train.activation_checkpointing=true", "train.activation_checkpointing_every=2"]
    assert build_config(None, [*tiny, *every]).hash == "f59c73abf9"
    msg = error(["train.activation_checkpointing_every=2"])
    assert "train.activation_checkpointing_every=2 needs train.activation_checkpointing" in msg
    assert "greater than or equal to 1" in error(["train.activation_checkpointing_every=0"])


def test_setting_the_objective_a_file_leaves_unnamed_keeps_its_keys():
    # A section without `name` is the default objective (ddpm): naming it is no switch, and
    # the file's other keys stay (they were dropped: another config, another hash).
    raw = {"objective": {"prediction": "v"}}
    assert build_config(raw, ["objective.name=ddpm"]).objective.prediction == "v"
    assert build_config(raw, ["objective.name=ddpm"]).hash == build_config(raw).hash
    assert build_config(raw, ["objective.name=flow"]).objective.name == "flow"  # a switch


def test_a_pair_written_wrong_is_told_how_to_write_it():
    # `--set optim.betas=0.9,0.95` is one string; `[100]` one value of a pair
    assert "optim.betas: got '0.9,0.95'; " in error(["optim.betas=0.9,0.95"])
    assert "written as a list: [a, b]" in error(["optim.betas=0.9,0.95"])
    msg = error(["eval.cfg_interval=[100]"])
    assert "eval.cfg_interval: too few values (value 2 is missing)" in msg
    assert build_config(None, ["optim.betas=[0.9,0.95]"]).optim.betas == (0.9, 0.95)
