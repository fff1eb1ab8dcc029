"""Config: presets, --field value overrides and their errors."""

import pytest

from config import PRESETS, Config, ConfigError, make_config, parse_args


def test_defaults_are_the_paper_setting_and_demo_is_the_cli_default():
    paper = make_config("sanf_cifar10")
    assert (paper.backbone, paper.img_size, paper.patch_grid) == ("vit_base_patch16_384.orig_in21k_ft_in1k", 384, 8)
    assert (paper.n_flow_layers, paper.hidden, paper.clamp, paper.lr) == (4, 1024, 3.0, 5e-5)
    assert (paper.beta1, paper.beta2, paper.weight_decay, paper.batch_size) == (0.8, 0.8, 1e-5, 32)
    assert paper == Config()
    assert parse_args([]) == make_config("demo")
    assert parse_args([]).dataset == "digits"


def test_every_preset_is_valid():
    for name in PRESETS:
        make_config(name)


def test_overrides_are_typed():
    config = parse_args(["--preset", "sanf_cifar10", "--epochs", "3", "--lr=0.01", "--download", "true",
                         "--fusion", "none", "--classes", "cat,dog"])
    assert (config.epochs, config.lr, config.download, config.fusion) == (3, 0.01, True, "none")
    assert config.class_list() == ["cat", "dog"]
    assert parse_args(["--classes", "all"]).class_list() is None


@pytest.mark.parametrize("argv, message", [
    (["--epoch", "3"], "valid fields: method"),
    (["--epochs", "three"], "expects int"),
    (["--fusion", "maybe"], "not one of: caff, none"),
    (["--preset", "nope"], "valid presets: demo"),
    (["--lr", "-1"], "must be >= 0"),
    (["--epochs"], "needs a value"),
    (["epochs", "3"], "expected --field value"),
    (["--download", "perhaps"], "expects bool"),
])
def test_bad_arguments_name_the_valid_ones(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(argv)


def test_config_is_frozen():
    with pytest.raises(Exception):
        make_config().epochs = 3  # type: ignore[misc]
