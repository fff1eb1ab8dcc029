"""Run folders: one per set of result settings, so runs with other settings never replace each other, and
--eval_only finds the run whose checkpoints its settings load."""

import dataclasses
import hashlib
import json

import pytest

import config as config_module
from config import Config, make_config, parse_args
from main import RUN_ONLY_FIELDS, evaluated_run, result_settings, results_folder, run
from model import DetectorError


def other_value(value):
    """A different value of the same type (validity does not matter: the folder only hashes the fields)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    return value + "x"


def test_run_only_fields_are_those_that_change_no_number():
    """device, threads, compile, stage_workers and batching of the backbone change numbers by float rounding at
    most; the others change where a run reads or writes, or which extra files it draws."""
    assert RUN_ONLY_FIELDS == {"device", "threads", "compile", "stage_workers", "num_workers", "extract_batch_size",
                               "cache_dir", "refresh_cache", "download", "results_dir", "eval_only",
                               "n_figure_images", "save_maps"}
    assert "test_batch_size" not in RUN_ONLY_FIELDS  # with --map_norm batch it changes the scores


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(Config) if f.name != "data_root"])
def test_every_result_setting_moves_the_folder_and_no_run_only_one_does(name):
    config = make_config("demo", classes="0,1")
    moved = dataclasses.replace(config, **{name: other_value(getattr(config, name))})
    assert (results_folder(moved).name == results_folder(config).name) == (name in RUN_ONLY_FIELDS)


def test_img_size_or_epochs_alone_give_another_folder_and_device_or_threads_do_not():
    base = make_config("demo", classes="0,1", epochs=1)
    assert results_folder(make_config("demo", classes="0,1", epochs=1, img_size=96)) != results_folder(base)
    assert results_folder(make_config("demo", classes="0,1", epochs=2)) != results_folder(base)
    assert results_folder(make_config("demo", classes="0,1", epochs=1, device="cuda", threads=1)) == \
        results_folder(base)
    assert results_folder(base).name.startswith("digits-tf_efficientnet_lite0-sanf-caff-")


def test_the_folder_names_its_data_by_the_resolved_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "parts").mkdir()
    relative = make_config("cflow_lite0", dataset="folder", data_root="parts")
    absolute = dataclasses.replace(relative, data_root=str(tmp_path / "parts"))
    assert results_folder(relative) == results_folder(absolute)
    assert results_folder(dataclasses.replace(relative, data_root="other")) != results_folder(relative)


def test_the_hash_is_of_the_result_settings_and_a_field_added_later_moves_no_saved_run(monkeypatch):
    config = make_config("demo")
    digest = hashlib.sha256(json.dumps(result_settings(config), sort_keys=True).encode()).hexdigest()[:8]
    assert results_folder(config).name.endswith(f"-sanf-caff-{digest}")
    assert set(result_settings(config)) == {f.name for f in dataclasses.fields(Config)} - RUN_ONLY_FIELDS - {
        "data_root", *(name for name, value in config_module.FIELDS_ADDED_LATER.items()
                       if getattr(config, name) == value)}
    # were knn_k added now with the value every earlier run had, those runs' folders would stay where they are
    before = results_folder(config)
    monkeypatch.setitem(config_module.FIELDS_ADDED_LATER, "knn_k", config.knn_k)
    assert "knn_k" not in result_settings(config)
    assert "knn_k" in result_settings(dataclasses.replace(config, knn_k=config.knn_k + 1))
    assert results_folder(config) != before  # the hash reads FIELDS_ADDED_LATER, as the claim needs


def test_a_config_read_back_from_a_saved_run_names_its_folder(tmp_path):
    saved = make_config("cflow_lite0", epochs=3, device="cpu")
    path = tmp_path / "results.json"
    old = saved.to_dict()
    for name in config_module.FIELDS_ADDED_LATER:  # a run saved before these fields existed
        del old[name]
    for payload in ({"config": saved.to_dict()}, {"config": old}):
        path.write_text(json.dumps(payload))
        assert results_folder(parse_args(["--config", str(path), "--eval_only", "--threads", "1"])) == \
            results_folder(saved)


def saved_run(config: Config):
    """A run folder as main.py leaves it, as far as evaluated_run reads it: checkpoints/ and results.json."""
    folder = results_folder(config)
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({"config": config.to_dict()}))
    return folder


def test_eval_only_finds_the_run_whose_checkpoints_its_settings_load(tmp_path):
    results = tmp_path / "results"
    short, long = (make_config("demo", results_dir=str(results), epochs=epochs, max_test=0) for epochs in (1, 2))
    folders = [saved_run(short), saved_run(long)]
    assert evaluated_run(dataclasses.replace(short, eval_only=True)) == folders[0]
    assert evaluated_run(dataclasses.replace(long, eval_only=True, max_test=50, scoring="z/max")) == folders[1]
    with pytest.raises(DetectorError, match=r"no run in .* was trained with these settings: .*epochs \(checkpoint "
                                            r"1, asked 3\) \| .*epochs \(checkpoint 2, asked 3\)"):
        evaluated_run(dataclasses.replace(short, eval_only=True, epochs=3))
    saved_run(dataclasses.replace(long, max_test=10))  # trained as ``long``, scored on fewer images
    with pytest.raises(DetectorError, match="were all trained with these settings; pass --config"):
        evaluated_run(dataclasses.replace(long, eval_only=True, max_test=50))
    (folders[0] / "results.json").write_text("{")
    with pytest.raises(DetectorError, match=r"its results.json holds no settings of this version \(JSONDecodeError\)"):
        evaluated_run(dataclasses.replace(short, eval_only=True, epochs=3))
    with pytest.raises(DetectorError, match="no run in .* train first"):
        evaluated_run(make_config("demo", method="knn", results_dir=str(results), eval_only=True))


def test_two_real_runs_that_differ_in_epochs_keep_two_complete_folders(tmp_path):
    common = ["--classes", "0,1", "--max_train_per_class", "30", "--max_test", "200",
              "--cache_dir", str(tmp_path / "cache"), "--results_dir", str(tmp_path / "results")]
    configs = [parse_args([*common, "--epochs", epochs]) for epochs in ("1", "2")]
    payloads = [run(config) for config in configs]
    folders = [results_folder(config) for config in configs]
    assert folders[0] != folders[1] and sorted(path.parent for path in (tmp_path / "results").glob("*/results.json")) \
        == sorted(folders)
    for folder, epochs in zip(folders, (1, 2)):
        stored = json.loads((folder / "results.json").read_text())
        assert stored["complete"] and stored["config"]["epochs"] == epochs and list(stored["per_class"]) == ["0", "1"]
        assert sorted(path.name for path in (folder / "checkpoints").iterdir()) == ["0.pt", "1.pt"]
        assert len((folder / "scores.csv").read_text().splitlines()) == 1 + 2 * 200
    replayed = run(parse_args(["--config", str(folders[0] / "results.json"), "--eval_only", "--threads", "1"]))
    assert replayed["per_class"]["0"]["image_auroc"] == payloads[0]["per_class"]["0"]["image_auroc"]
    assert (folders[0] / "eval_only" / "results.json").is_file() and not (folders[1] / "eval_only").exists()
