"""Config: resolution order (defaults < method < preset < file < flags), the generated parser and its errors."""

import dataclasses
import json
import re

import pytest

import config as config_module
from config import (METHOD_DEFAULTS, PRESET_GROUPS, PRESETS, Config, ConfigError, make_config, parse_args)

CFLOW = dict(n_flow_layers=8, clamp=1.9, condition_dims=128, fiber_batch=256, lr=2e-4, beta1=0.9, beta2=0.999,
             adam_eps=1e-8, weight_decay=0.0, batch_size=32)
SANF = dict(n_flow_layers=4, clamp=3.0, hidden=1024, heads=4, lr=5e-5, beta1=0.8, beta2=0.8, adam_eps=1e-4,
            weight_decay=1e-5, batch_size=32)  # eps: the public code's (ANCHORS A.3)


def values(config: Config, names) -> dict:
    return {name: getattr(config, name) for name in names}


def outside_presets(config: Config) -> dict:
    """Every field a preset may not set."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(Config)
            if f.metadata["group"] not in PRESET_GROUPS}


def test_method_alone_gives_that_methods_training_values():
    assert values(parse_args(["--method", "cflow"]), CFLOW) == CFLOW
    assert values(parse_args(["--method", "sanf"]), SANF) == SANF
    assert parse_args(["--method", "cflow"]).method == "cflow"


def test_field_defaults_are_the_paper_and_demo_is_the_cli_default():
    assert make_config("sanf_cifar10") == Config()
    assert values(Config(), METHOD_DEFAULTS["sanf"]) == METHOD_DEFAULTS["sanf"]
    assert parse_args([]) == make_config("demo")
    assert parse_args([]).dataset == "digits"


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_change_data_and_features_only(preset):
    config = make_config(preset)
    expected = {**{f.name: f.default for f in dataclasses.fields(Config)}, **METHOD_DEFAULTS[config.method]}
    assert outside_presets(config) == {name: expected[name] for name in outside_presets(config)}
    assert parse_args(["--preset", preset]) == config
    assert outside_presets(config) == outside_presets(parse_args(["--method", config.method]))


def test_a_preset_setting_training_values_is_refused(monkeypatch):
    monkeypatch.setitem(PRESETS, "bad", dict(dataset="mvtec", lr=1.0))
    monkeypatch.setitem(config_module.PRESET_NOTES, "bad", "sets lr")
    with pytest.raises(ConfigError, match="preset bad sets lr"):
        config_module._check_tables()


def test_cflow_preset_with_sanf_method_gets_sanf_training_and_the_presets_features():
    config = parse_args(["--preset", "cflow_lite0", "--method", "sanf"])
    assert values(config, SANF) == SANF
    assert (config.method, config.dataset, config.layers, config.img_size) == (
        "sanf", "mvtec", "auto", 256)


@pytest.mark.parametrize("preset", ["cflow_lite0", "cflow_mvtec"])
def test_cflow_presets_leave_the_stages_to_the_backbone(preset):
    """Another backbone under a CFLOW preset gets its own stages, not the preset backbone's names."""
    config = parse_args(["--preset", preset, "--backbone", "vit_small_patch14_dinov2"])
    assert config.layers == "auto" and config.layers_auto() and config.layer_list() == []
    assert parse_args(["--preset", preset, "--layers", " auto "]).layers_auto()


def test_explicit_flags_beat_preset_and_method_defaults():
    config = parse_args(["--preset", "cflow_lite0", "--img_size", "128", "--lr=1e-3", "--n_flow_layers", "2"])
    assert (config.img_size, config.lr, config.n_flow_layers, config.clamp) == (128, 1e-3, 2, 1.9)
    assert make_config("cflow_lite0", img_size=128, lr=1e-3, n_flow_layers=2) == config


def test_overrides_are_typed():
    config = parse_args(["--preset", "sanf_cifar10", "--epochs", "3", "--download", "--fusion", "none",
                         "--classes", "cat,dog", "--val_fraction", "0"])
    assert (config.epochs, config.download, config.fusion, config.val_fraction) == (3, True, "none", 0.0)
    assert type(config.val_fraction) is float and config.class_list() == ["cat", "dog"]
    assert parse_args(["--classes", "all"]).class_list() is None


def test_boolean_flags():
    assert parse_args([]).cache is True and parse_args(["--method", "cflow", "--no-cache"]).cache is False
    assert parse_args(["--no-cache", "--cache"]).cache is True
    config = parse_args(["--eval_only", "--refresh_cache", "--save_maps", "--permute_soft"])
    assert (config.eval_only, config.refresh_cache, config.save_maps, config.permute_soft) == (True,) * 4
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--cache", "false"])
    assert exit_info.value.code == 2


def help_output(argv, capsys, flag: str = "--help-all") -> str:
    with pytest.raises(SystemExit) as exit_info:
        parse_args([*argv, flag], prog="main.py")
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def help_text(argv, capsys, flag: str = "--help-all") -> str:
    return " ".join(help_output(argv, capsys, flag).split())


def default_in_help(text: str, name: str) -> str:
    return re.search(rf"--{name} \S+ .*?\(default: (\S*)\)", text).group(1)


def test_help_shows_the_defaults_in_force_and_the_groups(capsys):
    cflow = help_text(["--method", "cflow"], capsys)
    assert cflow.startswith("usage: main.py")
    assert (default_in_help(cflow, "fiber_batch"), default_in_help(cflow, "n_flow_layers")) == ("256", "8")
    assert default_in_help(cflow, "lr") == "0.0002"
    for title in config_module.GROUPS.values():
        assert f"{title}:" in cflow
    sanf = help_text([], capsys)
    assert (default_in_help(sanf, "n_flow_layers"), default_in_help(sanf, "dataset")) == ("4", "digits")
    assert "--cache, --no-cache" in sanf
    assert default_in_help(help_text(["--preset", "cflow_mvtec"], capsys), "backbone") == "wide_resnet50_2.tv_in1k"
    assert default_in_help(help_text(["--preset", "cflow_mvtec"], capsys, "--help"), "backbone") == \
        "wide_resnet50_2.tv_in1k"


def flags_listed(text: str) -> set[str]:
    """The --FIELD options a help text lists (each at the start of its line)."""
    return set(re.findall(r"^  --(\w+)", text, flags=re.MULTILINE))


@pytest.mark.parametrize("method", ["sanf", "cflow"])
def test_help_lists_the_main_fields_in_80_lines_and_help_all_every_field(method, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")  # a pipe's width: python main.py --help | wc -l
    short = help_output(["--method", method], capsys, "--help")
    every = help_output(["--method", method], capsys, "--help-all")
    fields = {f.name for f in dataclasses.fields(Config)}
    assert len(short.splitlines()) <= 80 and max(len(line) for line in short.splitlines()) <= 80
    assert flags_listed(short) - {"preset", "config", "help"} == set(config_module.HELP_FIELDS)
    assert flags_listed(every) - {"preset", "config", "help"} == fields
    assert "--help-all" in short and len(every.splitlines()) > 3 * len(short.splitlines())
    assert parse_args(["--method", method, "--hidden", "8"]).hidden == 8  # a field --help leaves out still parses


def test_every_help_text_is_short_and_tells_no_measurement(capsys):
    """Help says what a field does; timings and training curves belong in BENCHMARKS.md."""
    for f in dataclasses.fields(Config):
        doc = f.metadata["doc"]
        assert len(doc) <= 400 and "BENCHMARKS" not in doc and not re.search(r"\d\.\d+x\b|faster", doc), f.name
    assert len(config_module.HELP_FIELDS) >= 20 and all(len(line) <= 60 for line in config_module.HELP_FIELDS.values())


def test_config_file_round_trip(tmp_path):
    saved = make_config("cflow_lite0", epochs=3)
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"config": saved.to_dict(), "per_class": {}}))
    assert parse_args(["--config", str(path)]) == saved
    assert parse_args(["--config", str(path), "--epochs", "5"]) == dataclasses.replace(saved, epochs=5)
    bare = tmp_path / "config.json"
    bare.write_text(json.dumps({"method": "cflow", "clamp": 2}))
    assert (parse_args(["--config", str(bare)]).clamp, parse_args(["--config", str(bare)]).lr) == (2.0, 2e-4)
    assert parse_args(["--config", str(bare)]).adam_eps == 1e-8  # a partial file: the method's default


def test_a_saved_sanf_run_from_before_adam_eps_replays_with_the_eps_it_was_trained_with(tmp_path):
    """Every saved run lacking the field trained with torch's 1e-8; a checkpoint reads it so too, so
    --eval_only --config <old results.json> matches its checkpoint."""
    old = make_config("demo").to_dict()
    del old["adam_eps"]
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"config": old}))
    assert parse_args(["--config", str(path)]).adam_eps == 1e-8
    assert make_config("demo").adam_eps == 1e-4


@pytest.mark.parametrize("content, message", [
    ({"config": {"epochs": 3, "epoch": 4}}, "unknown field.s. epoch; valid fields: method"),
    ({"epochs": "three"}, "epochs must be int"),
    ([1, 2], "holds no JSON object"),
])
def test_bad_config_files_are_refused(content, message, tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ConfigError, match=message):
        parse_args(["--config", str(path)])


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.json"):
        parse_args(["--config", str(tmp_path / "nope.json")])


@pytest.mark.parametrize("argv, message", [
    (["--lr", "-1"], "lr must be >= 0"),
    (["--val_fraction", "0.7"], r"val_fraction must lie in \[0, 0.5\]"),
    (["--threshold_fpr", "0"], r"threshold_fpr must lie in \(0, 1\)"),
    (["--threshold_fpr", "1"], r"threshold_fpr must lie in \(0, 1\)"),
    (["--condition_dims", "130"], "multiple of 4"),
    (["--method", "cflow", "--layers", ""], "needs --layers"),
    (["--method", "knn", "--no-cache"], "method knn reads its features from the cache: drop --no-cache"),
    (["--method", "cflow", "--stage_workers", "0"], "stage_workers must be >= 1"),
    (["--method", "cflow", "--stage_workers", "2", "--no-cache"],
     r"over cached features: use it with --method cflow \(or sanf_cflow\), --cache and --device cpu"),
    (["--method", "cflow", "--stage_workers", "2", "--device", "cuda"], "--device cpu"),
    (["--method", "sanf", "--stage_workers", "2"], "--method cflow"),
    (["--method", "sanf_cflow", "--layers", ""], "needs --layers"),
])
def test_bad_values_are_refused(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(argv)


@pytest.mark.parametrize("argv", [
    ["--epoch", "3"], ["--epochs", "three"], ["--fusion", "maybe"], ["--preset", "nope"], ["--method", "svm"],
    ["--epochs"], ["epochs", "3"], ["--config"],
])
def test_argparse_errors_exit_2_with_usage_and_one_error_line(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv, prog="main.py")
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].startswith("usage: main.py") and lines[-1].startswith("main.py: error:")


def test_make_config_names_the_valid_presets_and_fields():
    with pytest.raises(ConfigError, match="valid presets: demo"):
        make_config("nope")
    with pytest.raises(ConfigError, match="unknown field.s. epoch; valid fields: method"):
        make_config(epoch=3)
    with pytest.raises(ConfigError, match="valid methods: sanf"):
        make_config(method="svm")


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        make_config().epochs = 3  # type: ignore[misc]


def test_a_dataset_without_preset_or_size_is_told_it_gets_the_demo_size(capsys):
    """Without --preset the demo preset's 64 px apply to every dataset; a note says so, unless a size or a
    preset was given."""
    config = parse_args(["--method", "cflow", "--dataset", "folder", "--data_root", "parts"])
    assert config.img_size == 64 and "resized to 64 px" in capsys.readouterr().out
    for argv in (["--method", "cflow", "--dataset", "folder", "--img_size", "256"],
                 ["--method", "cflow", "--dataset", "folder", "--img_size=64"],
                 ["--preset", "cflow_lite0", "--dataset", "folder"], [], ["--preset", "demo", "--dataset", "mvtec"]):
        parse_args(argv)
        assert "note" not in capsys.readouterr().out, argv


@pytest.mark.parametrize("device, message", [("gpu", "'gpu' is not a torch device"),
                                             ("cuda:x", "'cuda:x' is not a torch device")])
def test_a_device_torch_does_not_know_is_refused_naming_the_choices(device, message):
    from utils import check_device

    with pytest.raises(ConfigError, match=message + ": use cpu, cuda or cuda:N"):
        check_device(device)
    check_device("cpu")


def test_a_torch_device_other_than_cpu_or_cuda_is_refused_before_any_work():
    from utils import check_device

    with pytest.raises(ConfigError, match="--device mps: this code supports cpu and cuda only; use --device cpu"):
        check_device("mps")


def test_the_official_lr_schedule_is_cflow_s_over_whole_meta_epochs():
    assert parse_args(["--method", "cflow"]).lr_schedule == "constant"
    official = parse_args(["--method", "cflow", "--lr_schedule", "official", "--epochs", "200"])
    assert (official.lr_schedule, official.epochs // official.sub_epochs) == ("official", 25)
    with pytest.raises(ConfigError, match="--epochs 200"):
        parse_args(["--method", "cflow", "--lr_schedule", "official"])  # 10 epochs: not whole meta-epochs
    with pytest.raises(ConfigError, match="at least 24"):
        make_config("cflow_lite0", lr_schedule="official", epochs=16)  # 2 meta-epochs: only the warm-up
    assert make_config("cflow_lite0", lr_schedule="official", epochs=3, sub_epochs=1).epochs == 3
    with pytest.raises(ConfigError, match="method sanf trains at a constant lr"):
        make_config("demo", lr_schedule="official", epochs=24)
    with pytest.raises(ConfigError, match="sub_epochs must be >= 1"):
        make_config("cflow_lite0", sub_epochs=0)


def test_a_saved_run_from_before_the_lr_schedule_replays_at_the_constant_lr_it_trained_with(tmp_path):
    old = make_config("cflow_lite0").to_dict()
    for name in ("adam_eps", "lr_schedule", "sub_epochs", "rotate_degrees"):
        del old[name]
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"config": old}))
    replayed = parse_args(["--config", str(path)])
    assert (replayed.lr_schedule, replayed.adam_eps) == ("constant", 1e-8)
    assert replayed == make_config("cflow_lite0")


def test_rotation_needs_cflow_on_features_computed_on_the_fly():
    assert parse_args(["--method", "cflow"]).rotate_degrees == 0.0
    assert make_config("cflow_lite0", cache=False, rotate_degrees=5.0).rotate_degrees == 5.0
    with pytest.raises(ConfigError, match="--method cflow and --no-cache"):
        make_config("cflow_lite0", rotate_degrees=5.0)  # cached features
    with pytest.raises(ConfigError, match="--method cflow and --no-cache"):
        make_config("demo", rotate_degrees=5.0)
    with pytest.raises(ConfigError, match=r"rotate_degrees must lie in \[0, 180\]"):
        make_config("cflow_lite0", cache=False, rotate_degrees=200.0)
