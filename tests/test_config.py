"""Strict configs: every bad case fails before training with a message naming the key."""

import math

import pytest
import torch
import yaml
from pydantic import ValidationError

from dit_bench.config import (
    ConfigError,
    DataConfig,
    ExperimentConfig,
    build_config,
    load_config,
    parse_override,
)


def error(overrides: list[str], raw: dict | None = None) -> str:
    with pytest.raises(ConfigError) as e:
        build_config(raw, overrides)
    return str(e.value)


def test_default_is_a_small_dit_on_mnist():
    cfg = load_config()  # `dit-bench train` with no file, `make demo`
    assert cfg.data.name == "mnist"
    assert cfg.backbone.name.startswith("dit-")
    assert cfg.backbone.conditioning == "adaln_zero"
    assert cfg.objective.name == "flow" and cfg.eval.sampler == "euler"
    # A config file starts from the config types' defaults, not from the demo.
    assert build_config({}).objective.name == "ddpm"


def test_keys_later_issues_rely_on_exist():
    cfg = build_config(
        None,
        [
            "seed=3",
            "data.name=digits",
            "data.image_size=8",
            "backbone.name=dit-ti/2",
            "backbone.conditioning=adaln_zero",
            "objective.name=ddpm",
            "train.steps=10",
            "train.batch_size=4",
            "optim.lr=3e-4",
        ],
    )
    assert (cfg.seed, cfg.train.steps, cfg.train.batch_size, cfg.optim.lr) == (3, 10, 4, 3e-4)


def test_overrides_parse_yaml_scalars():
    cfg = build_config(None, ["optim.grad_clip=null", "optim.lr=1e-3", "backbone.learn_sigma=true"])
    assert cfg.optim.grad_clip is None and cfg.optim.lr == 1e-3 and cfg.backbone.learn_sigma


def test_unknown_key_names_key_and_allowed_keys():
    msg = error(["train.stepz=10"])
    assert "train.stepz" in msg and "unknown key" in msg and "steps" in msg and "batch_size" in msg


def test_unknown_section():
    msg = error(["trainer.steps=10"])
    assert "trainer" in msg and "allowed keys here" in msg and "train" in msg


def test_wrong_type_names_key():
    msg = error(["train.steps=many"])
    assert "train.steps" in msg and "integer" in msg


def test_impossible_value():
    assert "train.batch_size" in error(["train.batch_size=0"])
    assert "data.val_fraction" in error(["data.val_fraction=1.5"])


def test_unknown_dataset_lists_allowed():
    msg = error(["data.name=cifar"])
    assert "data.name" in msg and "mnist" in msg and "shapes" in msg and "folder" in msg


def test_unknown_backbone_lists_presets():
    msg = error(["backbone.name=dit-q/2"])
    assert "backbone.name" in msg and "dit-s/2" in msg and "dit-xl/2" in msg


def test_unknown_conditioning_lists_allowed():
    msg = error(["backbone.conditioning=film"])
    assert "backbone.conditioning" in msg and "adaln_zero" in msg


def test_patch_must_divide_image():
    msg = error(["data.name=digits", "backbone.name=dit-ti/4", "backbone.patch_size=3"])
    assert "backbone.patch_size=3" in msg and "image size 8" in msg


def test_heads_must_divide_width():
    msg = error(["backbone.num_heads=5"])
    assert "backbone.num_heads=5" in msg and "backbone.hidden_size" in msg


def test_folder_needs_root():
    assert "data.root" in error(["data.name=folder"])


def test_bad_override_syntax():
    assert "key=value" in error(["train.steps"])


def test_hash_is_stable_and_content_based():
    a, b = load_config(), load_config()
    assert a.hash == b.hash
    assert build_config(None, ["seed=1"]).hash != a.hash
    assert ExperimentConfig.model_validate(a.to_dict()).hash == a.hash
    # where it runs is not what it computes: a CPU DDP run resumes on one device (auto)
    assert load_config(None, ["train.accelerator=cpu"]).hash == a.hash


def test_config_is_frozen():
    cfg = load_config()
    with pytest.raises(ValidationError, match="frozen"):
        cfg.train.steps = 5


def test_yaml_file(tmp_path):
    p = tmp_path / "exp.yaml"
    p.write_text("experiment: tiny\ntrain:\n  steps: 7\n")
    cfg = load_config(p, ["train.batch_size=2"])
    assert (cfg.experiment, cfg.train.steps, cfg.train.batch_size) == ("tiny", 7, 2)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(p)


def test_set_objective_name_switches_objectives():
    """The README's `--set objective.name=ddpm --set eval.sampler=ddpm` on the default (flow)
    experiment: the flow-only `density` must not follow into DDPM's section. The new
    objective starts from its defaults; other objective.* keys apply whatever their order."""
    cfg = load_config(None, ["objective.name=ddpm", "eval.sampler=ddpm"])
    assert cfg.objective == build_config(None, []).objective  # DDPM's defaults
    v = load_config(None, ["objective.prediction=v", "objective.name=ddpm"])
    assert (v.objective.name, v.objective.prediction) == ("ddpm", "v")
    # the same name again is no switch: the file's keys stay
    flow = load_config(None, ["objective.name=flow"])
    assert flow.objective == load_config().objective and flow.objective.density == "logit_normal"
    with pytest.raises(ConfigError, match="objective.density"):  # a flow key on DDPM still fails
        load_config(None, ["objective.name=ddpm", "objective.density=uniform"])


def test_setting_the_objective_a_file_has_keeps_the_file_s_keys(tmp_path):
    path = tmp_path / "flow.yaml"
    path.write_text("objective: {name: flow, shift: 3.0}\n")
    kept = load_config(path, ["objective.name=flow"])
    assert kept.objective.shift == 3.0  # not reset to the default 1.0 by a no-op switch


def test_only_the_last_of_repeated_name_sets_switches(tmp_path):
    """`--set objective.name=ddpm ... --set objective.name=flow` (a script's default, then the
    user's) on a flow file is no switch: the file's flow keys stay, where they were reset to
    flow's defaults on the way through DDPM; likewise a family named on the way."""
    path = tmp_path / "flow.yaml"
    path.write_text("objective: {name: flow, density: uniform, shift: 3.0}\n")
    cfg = load_config(path, ["objective.name=ddpm", "objective.name=flow"])
    assert cfg.objective == load_config(path).objective
    raw = {"backbone": {"name": "dit-xs/4", "conditioning": "cross_attn"}}
    cfg = build_config(raw, ["backbone.name=unet-xs", "backbone.name=dit-ti/4"])
    assert cfg.backbone.conditioning == "cross_attn"
    # the last name still switches, as one --set of it does
    assert (
        load_config(path, ["objective.name=flow", "objective.name=ddpm"]).objective.name == "ddpm"
    )


def test_a_whole_objective_after_one_of_its_keys_is_refused():
    # the mapping replaced the section: shift=3 given first trained at shift 1, silently
    with pytest.raises(ConfigError, match="objective.shift=3' given before it"):
        load_config(None, ["objective.shift=3", "objective={name: flow, density: uniform}"])
    after = load_config(None, ["objective={name: flow, density: uniform}", "objective.shift=3"])
    assert (after.objective.density, after.objective.shift) == ("uniform", 3.0)


def test_set_backbone_name_switches_families():
    # the demo names adaln_zero: a family without it takes its own scheme, as the README says
    assert load_config(None, ["backbone.name=unet-xs"]).backbone.conditioning == "adagn"
    assert load_config(None, ["backbone.name=mmdit-d2/4"]).backbone.conditioning == "joint_attn"
    assert load_config(None, ["backbone.name=uvit-xs/4"]).backbone.conditioning == "in_context"
    raw = {"backbone": {"name": "dit-xs/4", "conditioning": "in_context"}}
    for name in ("dit-ti/4", "uvit-xs/4"):  # a scheme the new family has is kept
        assert build_config(raw, [f"backbone.name={name}"]).backbone.conditioning == "in_context"
    # a scheme given with the name is the user's: refused where the family lacks it
    assert "allowed: adagn" in error(["backbone.name=unet-xs", "backbone.conditioning=adaln"])
    # in a file it stays an error: only --set switches
    raw = {"backbone": {"name": "unet-xs", "conditioning": "adaln_zero"}}
    assert "not implemented for 'unet'" in error([], raw)


def read_yaml_text(text: str) -> dict:
    import yaml

    from dit_bench.config import _Loader

    return yaml.load(text, Loader=_Loader)


def test_booleans_are_not_numbers():
    assert (
        error(["train.steps=true"]) == "invalid config:\n  train.steps: expected a number, got True"
    )
    assert "optim.lr: expected a number" in error(["optim.lr=false"])
    assert "optim.betas: expected a number" in error(["optim.betas=[true, 0.9]"])
    assert build_config(None, ["train.steps=1.0e+3"]).train.steps == 1000  # YAML floats still do
    # YAML 1.2's dotless exponents too (PyYAML read them as strings), in files and --set alike
    assert build_config(None, ["train.steps=1e3", "optim.lr=2e-4"]).train.steps == 1000
    assert build_config({"optim": {"lr": "2e-4"}}).optim.lr == 2e-4
    # and its dotted ones without a sign: 2.0e3 was the string "2.0e3", an error for an int
    assert build_config(None, ["train.steps=2.0e3"]).train.steps == 2000
    assert read_yaml_text("train: {steps: 2.0e3}")["train"]["steps"] == 2000.0
    # 1.1's octal and base 60 are gone: 010 is ten, 1:30 a string (refused, naming the key)
    assert build_config(None, ["train.steps=010"]).train.steps == 10
    assert "train.steps" in error(["train.steps=1:30"])
    assert parse_override("a=0x10") == (["a"], 16) and parse_override("a=-1_000") == (["a"], -1000)
    assert parse_override("a=1:30.0")[1] == "1:30.0" and parse_override("a=1_2:30")[1] == "1_2:30"
    # and a string that reads as a number now is written quoted: config.yaml reads back
    cfg = build_config({"experiment": "2.0e3"})
    assert "experiment: '2.0e3'" in cfg.to_yaml()
    assert build_config(read_yaml_text(cfg.to_yaml())).hash == cfg.hash


def test_a_date_like_value_is_the_text_written(tmp_path):
    # YAML 1.1 read `2024-06-01` as a date, which no key takes: `experiment: 2024-06-01` (or a
    # data folder so named) failed as a TypeError from the overrides' JSON copy, not an error
    path = tmp_path / "dated.yaml"
    path.write_text("experiment: 2024-06-01\n")
    assert load_config(path).experiment == "2024-06-01"
    cfg = load_config(None, ["experiment=2024-06-01"])
    assert cfg.experiment == "2024-06-01"
    assert build_config(read_yaml_text(cfg.to_yaml())).hash == cfg.hash
    assert yaml.safe_load(cfg.to_yaml())["experiment"] == "2024-06-01"  # quoted for 1.1 readers
    assert read_yaml_text("root: 2024-06-01 10:00:00") == {"root": "2024-06-01 10:00:00"}


def test_a_name_yaml_reads_as_a_number_says_to_quote_it():
    # `--set data.root=2024` or `experiment: off` said "Input should be a valid string"
    assert error(["experiment=2024"]) == (
        "invalid config:\n  experiment: got 2024, which YAML reads as a number; write it in quotes"
    )
    assert "backbone.name: got False, which YAML reads as a boolean" in error(["backbone.name=no"])
    assert build_config(None, ["experiment='2024'"]).experiment == "2024"


def test_chained_yaml_merges_keep_the_nearest_value():
    # b overrides a's x and c merges b: c's x is b's. PyYAML's merge dropped a key it had met
    # by the identity of its string (one-letter ones are shared) and gave c a's x; merged in
    # before its own turn, b read as giving x twice
    text = "a: &a {x: 1, y: 1}\nb: &b {<<: *a, x: 2}\nc: {<<: *b, z: 3}\n"
    assert read_yaml_text(text)["c"] == {"x": 2, "y": 1, "z": 3}
    nested = "defs: {a: &a {x: 1}, b: &b {<<: *a, x: 2}}\nc: {<<: *b}\n"
    assert read_yaml_text(nested) == {"defs": {"a": {"x": 1}, "b": {"x": 2}}, "c": {"x": 2}}
    # a list of merges: the first one wins, the mapping's own keys over all
    both = "a: &a {x: 1}\nb: &b {x: 2, y: 2}\nc: {<<: [*a, *b], y: 3}\n"
    assert read_yaml_text(both)["c"] == {"x": 1, "y": 3}
    with pytest.raises(yaml.YAMLError, match="key 'x' given twice"):
        read_yaml_text("a: &a {x: 1}\nb: {<<: *a, x: 2, x: 3}\n")


def test_numbers_are_not_booleans():
    # lax mode read 1, 0 and "yes" as booleans: a switch takes true or false only
    assert "train.compile: expected true or false, got 1" in error(["train.compile=1"])
    assert "eval.use_ema: expected true or false, got 0" in error(["eval.use_ema=0"])
    assert "train.compile: expected true or false, got 'yes'" in error(
        [], {"train": {"compile": "yes"}}
    )
    assert build_config(None, ["train.compile=true", "eval.use_ema=false"]).train.compile


def test_infinite_values_are_refused():  # `.inf` passes gt=0: it diverged at step 5
    for item in ("optim.lr=.inf", "eval.cfg_scale=.inf", "optim.grad_clip=.inf"):
        key = item.split("=")[0]
        assert f"{key}: Input should be a finite number" in error([item])


def test_values_that_would_fail_mid_run_are_refused_up_front():
    ddpm = ["objective.name=ddpm"]
    assert "needs more than 20" in error([*ddpm, "objective.num_timesteps=20"])  # alpha_bar = 0
    assert "eval.sample_steps=101: DDPM has objective.num_timesteps=100" in error(
        [*ddpm, "objective.num_timesteps=100", "eval.sample_steps=101"]
    )
    assert "eval.val_levels=200" in error(
        [*ddpm, "objective.num_timesteps=100", "eval.val_levels=200"]
    )
    # the default validation grid (10 levels) on a shorter cosine chain: it failed at step 4
    few = [*ddpm, "objective.schedule=cosine", "objective.num_timesteps=5", "eval.sample_steps=2"]
    assert "set eval.val_levels to at most 5" in error([*few, "eval.sampler=ddpm"])
    build_config(None, [*few, "eval.sampler=ddpm", "eval.val_levels=5"])
    assert "optim.betas.0" in error(["optim.betas=[1.5, 0.999]"])
    assert "seed" in error(["seed=-1"]) and "seed" in error([f"seed={2**32}"])
    assert "over train.devices x train.num_nodes = 3" in error(
        ["train.devices=3", "train.batch_size=8"]
    )
    assert "eval.cfg_channels=3: the data has 1 channel" in error(["eval.cfg_channels=3"])
    msg = error(["backbone.learn_sigma=true"], {"objective": {"name": "flow"}})
    assert msg == (
        "invalid config:\n  backbone.learn_sigma=true needs objective.name=ddpm "
        "(flow matching has no variance to learn)"
    )  # a check across sections: no "<config>:" label


def test_yaml_errors_name_the_file_or_the_override(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {steps: 10\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    assert "--set 'train.steps=[1': the value is not valid YAML" in error(["train.steps=[1"])


def test_data_paths_expand_the_home_folder(monkeypatch, tmp_path):
    # `--set data.root=~/x`: the shell leaves a ~ after `=` alone
    monkeypatch.setenv("HOME", str(tmp_path))
    d = DataConfig(name="latents", root="~/x", vae="~/vae")
    assert (d.root, d.vae) == (str(tmp_path / "x"), str(tmp_path / "vae"))


def test_a_data_path_spelled_another_way_is_the_same_run(tmp_path):
    # A shell's tab completion ends a folder with "/": `--set data.root=imgs/` one day and
    # `imgs` the next read the same images, and the rerun must find the run, not train anew
    folder = ["data.name=folder", "data.image_size=8"]
    run = build_config(None, [*folder, f"data.root={tmp_path}/imgs"])
    for spelled in (f"{tmp_path}/imgs/", f"{tmp_path}/./imgs", f"{tmp_path}//imgs/"):
        same = build_config(None, [*folder, f"data.root={spelled}"])
        assert (same.data.root, same.hash) == (run.data.root, run.hash), spelled
    relative = build_config(None, [*folder, "data.root=imgs"])
    assert build_config(None, [*folder, "data.root=./imgs/"]).hash == relative.hash
    # ".." is kept: through a symbolic link, a/../b need not be b
    assert build_config(None, [*folder, "data.root=a/../imgs"]).data.root == "a/../imgs"
    latents = DataConfig(name="latents", root="shards/", vae="./models/vae/")
    assert (latents.root, latents.vae) == ("shards", "models/vae")


def test_keys_that_would_do_nothing_or_misplace_runs_are_refused():
    # a key the data set never reads changed the hash (same training, another run directory)
    assert "data.vae applies to data.name=latents only, not mnist" in error(["data.vae=/x"])
    assert "data.root applies to data.name=folder|latents only" in error(["data.root=/x"])
    assert "data.num_samples applies to data.name=shapes only" in error(["data.num_samples=10"])
    assert build_config(None, ["data.name=shapes", "data.num_samples=10"]).data.num_samples == 10
    assert "data.split_seed" in error(["data.split_seed=-5"])
    for name in ("..", ".", "-x"):  # runs would land beside or above --out
        assert "experiment" in error([f"experiment={name}"])
    # folders Windows cannot make (devices, with any extension) or makes under another name
    for name, why in (("nul", "NUL"), ("Com3.runs", "COM3"), ("lpt9", "LPT9"), ("x.", "'.'")):
        assert f"experiment={name}: the runs' folder" in error([f"experiment={name}"])
        assert why in error([f"experiment={name}"])
    for name in ("console", "com10", "nul-cpu", "auxiliary.x"):  # not devices
        assert build_config(None, [f"experiment={name}"]).experiment == name
    assert build_config({"experiment": "con"}, stored=True).experiment == "con"  # made before
    # the runs' folder: past a file name's 255 bytes, `train` failed at its mkdir
    assert "experiment: String should have at most 255 characters" in error(
        ["experiment=" + "x" * 256]
    )
    assert build_config(None, ["experiment=" + "x" * 255]).experiment == "x" * 255
    # guidance options without guidance, and guidance against a null class never trained
    assert "eval.cfg_interval applies to guided sampling" in error(
        ["eval.cfg_scale=1", "eval.cfg_interval=[0, 500]"]
    )
    assert "eval.cfg_channels applies to guided sampling" in error(
        ["eval.cfg_scale=1", "eval.cfg_channels=1"]
    )
    assert "which train.label_dropout=0 never trains" in error(["train.label_dropout=0"])
    assert (
        build_config(None, ["train.label_dropout=0", "eval.cfg_scale=1"]).train.label_dropout == 0
    )
    # a 1-step DDPM chain keeps only t = 0: pure noise denoised as if nearly clean
    assert "eval.sample_steps=1: a DDPM chain" in error(["eval.sample_steps=1"])
    flow = build_config(None, ["objective.name=flow", "eval.sampler=euler", "eval.sample_steps=1"])
    assert flow.eval.sample_steps == 1  # one Euler step of a flow is a valid (coarse) sampler


def test_a_guidance_interval_that_holds_no_level_of_the_sampling_grid_is_refused():
    # [500, 500] with DDPM's 50 respaced steps (t = 489, 510) and flow's [0, 0] (its grid
    # starts at t = 1000 / steps) guided nothing: every grid and FD of the run unguided
    guided = ["eval.cfg_scale=3", "train.label_dropout=0.1"]
    msg = error([*guided, "eval.cfg_interval=[500,500]"])
    assert "eval.cfg_interval=[500, 500] holds none of the 50 sampling levels" in msg
    assert build_config(None, [*guided, "eval.cfg_interval=[510,510]"]).eval.cfg_interval
    flow = [*guided, "objective.name=flow", "eval.sampler=euler"]
    assert "nearest: 20" in error([*flow, "eval.cfg_interval=[0,0]"])
    assert build_config(None, [*flow, "eval.cfg_interval=[0,20]"]).eval.cfg_interval


def test_a_guidance_interval_beyond_ddpm_s_timesteps_is_refused():
    # DDPM's net sees timesteps 0..T-1: with T=100, [500, 1000] never guided at all
    guided = ["eval.cfg_scale=3", "train.label_dropout=0.1"]
    msg = error([*guided, "objective.num_timesteps=100", "eval.cfg_interval=[500,1000]"])
    assert "eval.cfg_interval=[500, 1000]: DDPM's net timesteps run 0..99" in msg
    assert build_config(None, [*guided, "eval.cfg_interval=[500,1000]"]).eval.cfg_interval
    # empty exactly when lo > T-1: [100, 100] guides nothing (hi is not past T = 100) ...
    msg = error([*guided, "objective.num_timesteps=100", "eval.cfg_interval=[100,100]"])
    assert "eval.cfg_interval=[100, 100]" in msg and "would guide nothing" in msg
    # ... while [50, 1000] guides steps 50..99 (a hi past T-1 only covers the top steps)
    cfg = build_config(
        None, [*guided, "objective.num_timesteps=100", "eval.cfg_interval=[50,1000]"]
    )
    assert cfg.eval.cfg_interval == (50, 1000)
    assert build_config(
        None, [*guided, "objective.num_timesteps=100", "eval.cfg_interval=[99,1000]"]
    ).eval.cfg_interval == (99, 1000)


def test_a_set_of_a_whole_section_is_refused_but_the_objective_may_be_switched(tmp_path):
    """`--set 'train={steps: 5}'` replaced the section: the file's other train keys fell back
    to the defaults and the run trained. Refused, as in ablation variants and sweep choices;
    the objective, whose name picks its keys, may still be given whole."""
    path = tmp_path / "c.yaml"
    path.write_text("train: {steps: 500, batch_size: 8, val_every: 100}\n")
    with pytest.raises(ConfigError, match=r"--set 'train=\{steps: 5\}': train is given a mapping"):
        load_config(path, ["train={steps: 5}"])
    assert load_config(path, ["train.steps=5"]).train.batch_size == 8
    assert (
        load_config(None, ["objective={name: ddpm}", "eval.sampler=ddpm"]).objective.name == "ddpm"
    )


# Configs a fuzzer found that passed validation and then failed (or went NaN) in training


def _refusal(raw: dict) -> str:
    with pytest.raises(ConfigError) as e:
        build_config(raw)
    return str(e.value)


@pytest.mark.parametrize("shift", [1e-17, 1e-300, 1e39, 1e300])
def test_a_flow_shift_beyond_float_range_is_refused_naming_the_key(shift):
    # 1e-300: a * t is 0 in float32, a training time t = 1 becomes 0 / 0 (and 1e-17, in
    # the form 1 + (a - 1) t that shift_time had, made the grid's t = 1 0 / 0 in float64);
    # 1e39: a * t overflows float32, every training time is NaN and step 1's loss is NaN
    message = _refusal({"objective": {"name": "flow", "shift": shift}})
    assert "objective.shift" in message


@pytest.mark.parametrize("shift", [1e-6, 0.5, 3.0, 1e6])
def test_every_accepted_flow_shift_keeps_the_times_finite_and_in_0_1(shift):
    from dit_bench.objectives.flow import flow_levels, shift_time

    cfg = build_config({"objective": {"name": "flow", "shift": shift}})
    levels = flow_levels(50, cfg.objective.shift)
    assert torch.isfinite(levels.sigmas).all()
    # t = 1 (pure noise) stays 1 up to float64 rounding of 1 + (a - 1), about 1e-16 / a
    assert levels.sigmas.min() >= 0 and abs(levels.sigmas[-1].item() - 1) < 1e-9
    t = shift_time(torch.tensor([0.0, 1e-7, 0.5, 0.9999999]), cfg.objective.shift)  # float32
    assert torch.isfinite(t).all() and t.min() >= 0 and t.max() <= 1


def test_weight_decay_that_flips_the_weights_is_refused_naming_both_keys():
    # AdamW multiplies every weight by 1 - lr * weight_decay each step: at lr 1e-3 and
    # weight_decay 1e6 that is -999, and the validation loss and samples were NaN after two
    # steps of a run that "finished" without an error
    message = _refusal({"optim": {"lr": 1e-3, "weight_decay": 1e6}})
    assert "optim.weight_decay" in message and "optim.lr" in message
    assert "\n  optim.weight_decay=" in message  # names its keys: no "optim: " label before
    # exactly 1 zeroes every weight at the first step
    assert "must be below 1" in _refusal({"optim": {"lr": 0.5, "weight_decay": 2.0}})
    assert math.isclose(
        build_config({"optim": {"lr": 1e-3, "weight_decay": 0.05}}).optim.weight_decay, 0.05
    )


@pytest.mark.parametrize("text", ["[]", "0", "false", "''", "- train"])
def test_a_file_that_is_no_mapping_is_refused_even_when_it_reads_as_nothing(tmp_path, text):
    # `[]`, `0`, `false` and `''` read as no keys (`or {}`), so the file trained the defaults
    from dit_bench.config import read_yaml

    path = tmp_path / "exp.yaml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        read_yaml(path)
    path.write_text("# nothing set yet\n")  # empty, or comments only: no keys, as before
    assert read_yaml(path) == {}


def test_an_empty_data_path_is_refused_as_the_config_is_read():
    # `--set data.root=$ROOT` with ROOT unset failed only once the data loaded
    for key in ("data.root", "data.vae"):
        assert f"{key}: an empty path; give a folder, or null for none" in error([f"{key}="])
    assert build_config(None, ["data.root=null"]).data.root is None
