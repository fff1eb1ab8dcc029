"""Trained detectors as files: predict.py round trips, checkpoint checks, folder names that do not collide.

The data are scikit-learn's bundled digits written as PNG files into an MVTec-style folder
(``train/good`` = zeros, ``test/good`` = other zeros, ``test/one`` = ones), so that every path
through real image files runs offline.
"""

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import predict
from config import make_config
from datasets import DataError, held_out_split, load_tasks
from main import results_folder, run
from model import DetectorError, load_detector
from report import read_scores_csv

ROOT = __import__("conftest").ROOT


def digits_folder(root: Path, n_train: int = 60, n_test: int = 15, defects: bool = True) -> Path:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    zeros, ones = np.flatnonzero(bunch.target == 0), np.flatnonzero(bunch.target == 1)
    parts = {"train/good": zeros[:n_train], "test/good": zeros[n_train:n_train + n_test]}
    if defects:
        parts["test/one"] = ones[:n_test]
    for folder, indices in parts.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for index in indices:
            Image.fromarray(pixels[index]).resize((32, 32), Image.NEAREST).save(root / folder / f"{index}.png")
    return root


def folder_config(data: Path, tmp_path: Path, method: str, **overrides):
    values = dict(method=method, dataset="folder", data_root=str(data), epochs=2, hidden=64,
                  cache_dir=str(tmp_path / "cache"), results_dir=str(tmp_path / "results"))
    return make_config("demo", **{**values, **overrides})


@pytest.mark.parametrize("method", ["sanf", "knn", "gaussian"])
def test_predict_gives_the_scores_of_the_evaluation(method, tmp_path):
    data = digits_folder(tmp_path / "digits")
    config = folder_config(data, tmp_path, method)
    metrics = run(config)["per_class"]["digits"]
    assert metrics["image_auroc"] > 0.9 and metrics["n_held_out"] == 6  # 10% of 60
    folder = results_folder(config)
    checkpoint = folder / "checkpoints" / "digits.pt"
    saved = torch.load(checkpoint, weights_only=True)  # no pickled code needed to open it
    assert saved["method"] == method and json.loads(saved["config"])["token_norm"] == "power"
    out = tmp_path / "predicted"
    predict.main(["--checkpoint", str(checkpoint), "--images", str(data / "test"), "--out", str(out)])
    evaluated, predicted = read_scores_csv(folder / "scores.csv"), read_scores_csv(out / "predictions.csv")
    assert set(predicted) == set(evaluated) and len(predicted) == 30
    assert max(abs(predicted[path] - evaluated[path]) for path in predicted) <= 1e-5
    threshold = json.loads((folder / "results.json").read_text())["per_class"]["digits"]["threshold"]
    # the threshold is the 0.99 quantile of the held-out training images' scores, scored here from their files
    task = load_tasks(config)[0]
    held_out = held_out_split(len(task.train), config.val_fraction, config.seed)[1]
    held_out_scores = load_detector(checkpoint).predict([task.train.source(i) for i in held_out]).scores
    # these 6 images go through the backbone as another batch than in the evaluation: float32 rounding of the
    # features then differs, and the Gaussian's Mahalanobis scores (about 4,000 here) carry it relatively
    assert threshold == pytest.approx(np.quantile(held_out_scores, 1 - config.threshold_fpr), rel=1e-5, abs=1e-5)
    for row in csv.DictReader(open(out / "predictions.csv")):
        assert int(row["anomalous"]) == int(float(row["score"]) > threshold)
    assert not (out / "maps").exists()  # image-level methods have no maps


@pytest.mark.parametrize("method", ["sanf", "cflow"])
def test_detector_predict_scores_paths_pictures_arrays_and_tensors_alike(method, tmp_path):
    """Detector.predict (the Python inferencer) gives the evaluation's scores for files, and the same scores
    for the same pictures given as PIL images, uint8 arrays, uint8 tensors or float tensors in [0, 1]."""
    data = digits_folder(tmp_path / "digits", n_test=4)
    config = folder_config(data, tmp_path, method, layers="blocks.2,blocks.4")
    run(config)
    folder = results_folder(config)
    evaluated = read_scores_csv(folder / "scores.csv")
    detector = load_detector(folder / "checkpoints" / "digits.pt")
    paths = sorted(evaluated)
    from_files = detector.predict(paths)
    assert np.abs(from_files.scores - np.array([evaluated[p] for p in paths])).max() <= 1e-5
    assert np.array_equal(from_files.anomalous, from_files.scores > detector.threshold)
    assert (from_files.maps is None) == (method != "cflow")
    pictures = [Image.open(p) for p in paths]  # 32 x 32 grayscale files, resized to img_size 64 as in training
    arrays = [np.array(p.convert("RGB")) for p in pictures]
    tensors = torch.stack([torch.from_numpy(a).permute(2, 0, 1) for a in arrays])
    for inputs in (pictures, arrays, tensors, tensors.float() / 255, list(tensors)):
        again = detector.predict(inputs, batch_size=3)
        np.testing.assert_allclose(again.scores, from_files.scores, rtol=0, atol=1e-5)
        if method == "cflow":
            assert again.maps.shape == (len(paths), 64, 64)
            np.testing.assert_allclose(again.maps, from_files.maps, rtol=0, atol=1e-4)
    assert detector.predict(paths[0]).scores.shape == (1,)
    with pytest.raises(DataError, match="floats in \\[0, 1\\]"):
        detector.predict(tensors.float())
    with pytest.raises(DataError, match="image 1: .*\\(a grey one: image.expand\\(3, -1, -1\\)\\)"):
        detector.predict([tensors[0], tensors[0, :1]])
    with pytest.raises(DataError, match="RGBA: drop the alpha channel"):
        detector.predict(np.zeros((8, 8, 4), np.uint8))
    with pytest.raises(DataError, match="no image file"):
        detector.predict(str(tmp_path / "missing.png"))
    with pytest.raises(DataError, match="is a folder; pass its files"):
        detector.predict(data / "test")


def test_a_test_split_with_normal_images_only_still_writes_scores(tmp_path):
    data = digits_folder(tmp_path / "digits", defects=False)
    payload = run(folder_config(data, tmp_path, "knn"))
    metrics = payload["per_class"]["digits"]
    assert "image_auroc" not in metrics and "only normal images" in metrics["note"]
    assert "n/a" in (results_folder(folder_config(data, tmp_path, "knn")) / "results.md").read_text()
    rows = (results_folder(folder_config(data, tmp_path, "knn")) / "scores.csv").read_text().splitlines()
    assert len(rows) == 1 + 15


def test_two_folder_datasets_of_one_name_keep_their_own_cache_and_results(tmp_path):
    first, second = digits_folder(tmp_path / "a" / "data"), digits_folder(tmp_path / "b" / "data", n_train=40)
    payloads = [run(folder_config(data, tmp_path, "knn")) for data in (first, second)]
    folders = [results_folder(folder_config(data, tmp_path, "knn")) for data in (first, second)]
    assert folders[0] != folders[1] and all((f / "results.json").is_file() for f in folders)
    assert [p["per_class"]["data"]["n_fit"] for p in payloads] == [54, 36]
    assert json.loads((folders[0] / "results.json").read_text())["per_class"]["data"]["n_fit"] == 54
    assert len([p for p in (tmp_path / "cache").iterdir() if p.is_dir()]) == 2


def test_checkpoints_refuse_other_settings_and_foreign_files(tmp_path):
    data = digits_folder(tmp_path / "digits")
    config = folder_config(data, tmp_path, "sanf")
    run(config)
    checkpoint = results_folder(config) / "checkpoints" / "digits.pt"
    detector = load_detector(checkpoint, config)
    assert detector.threshold > 0
    size = config.img_size
    with pytest.raises(DetectorError, match=rf"uint8 images of shape \(B, 3, {size}, {size}\); got torch.float32"):
        detector.score_images(torch.rand(2, 3, size, size))
    with pytest.raises(DetectorError, match=r"got torch.uint8 \(2, 3, 20, 20\)"):
        detector.score_images(torch.zeros(2, 3, 20, 20, dtype=torch.uint8))
    with pytest.raises(DetectorError, match=r"hidden \(checkpoint 64, asked 32\); clamp \(checkpoint 3.0, asked 2.0\)"):
        load_detector(checkpoint, folder_config(data, tmp_path, "sanf", hidden=32, clamp=2.0))
    # --eval_only also refuses the settings that made the checkpoint: its results.json would report them
    with pytest.raises(DetectorError, match=r"lr \(checkpoint 5e-05, asked 0.001\); val_fraction \(checkpoint 0.1, "
                                            r"asked 0.2\)"):
        run(folder_config(data, tmp_path, "sanf", eval_only=True, lr=1e-3, val_fraction=0.2))
    folder = results_folder(config)
    before = (folder / "scores.csv").read_bytes()
    rescored = run(folder_config(data, tmp_path, "sanf", eval_only=True, max_test=10))
    assert rescored["per_class"]["digits"]["n_held_out"] == 6 and rescored["per_class"]["digits"]["n_test"] == 10
    assert (folder / "scores.csv").read_bytes() == before  # the run it rescored is left as it was
    assert len((folder / "eval_only" / "scores.csv").read_text().splitlines()) == 11
    assert json.loads((folder / "results.json").read_text())["config"]["eval_only"] is False
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(checkpoint.read_bytes()[:1000])
    for path, message in ((foreign, "not a detector checkpoint"), (corrupt, "cannot read checkpoint"),
                          (tmp_path / "missing.pt", "no checkpoint")):
        with pytest.raises(DetectorError, match=message):
            load_detector(path)
        result = subprocess.run([sys.executable, str(ROOT / "predict.py"), "--checkpoint", str(path), "--images",
                                 str(data / "test"), "--out", str(tmp_path / "out")], capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert result.stderr.strip().count("\n") == 0 and message in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_batch_of_maps_is_written_each_under_its_own_name(tmp_path):
    names = [f"image_{index}" for index in range(5)]
    maps = np.stack([np.full((8, 8), index, dtype=np.float32) for index in range(5)])
    images = torch.arange(5, dtype=torch.uint8).view(5, 1, 1, 1).expand(5, 3, 8, 8).contiguous()
    predict._write_maps(tmp_path, names, maps, images, map_threshold=2.0, overlays=True)
    for index, name in enumerate(names):
        assert np.array_equal(np.load(tmp_path / "maps" / f"{name}.npy"), np.full((8, 8), index, np.float16))
        overlay = np.asarray(Image.open(tmp_path / "overlays" / f"{name}.png"))
        assert overlay.shape == (8, 8, 3) and len(np.unique(overlay.reshape(-1, 3), axis=0)) == 1
    colours = [tuple(np.asarray(Image.open(tmp_path / "overlays" / f"{name}.png"))[0, 0]) for name in names]
    assert len(set(colours)) == 5  # each overlay drawn from its own map and image


def test_predict_replaces_earlier_outputs_only_when_every_image_is_scored_and_skips_its_own_folder(tmp_path):
    """A corrupt image stops the run with the earlier run's outputs as they were (no half-written maps);
    an --out inside --images is not scored; the overlays' scale is the maps' own threshold."""
    data = digits_folder(tmp_path / "digits", n_test=4)
    config = folder_config(data, tmp_path, "cflow", layers="blocks.2,blocks.4", scoring="z/max")
    run(config)
    checkpoint = results_folder(config) / "checkpoints" / "digits.pt"
    detector = load_detector(checkpoint)
    task = load_tasks(config)[0]
    held_out = [task.train.source(i) for i in held_out_split(len(task.train), config.val_fraction, config.seed)[1]]
    map_maxima = detector.predict(held_out).maps.reshape(len(held_out), -1).max(axis=1)
    assert detector.map_threshold == pytest.approx(np.quantile(map_maxima, 1 - config.threshold_fpr), rel=1e-5)
    assert abs(detector.map_threshold - detector.threshold) > 0.1  # a z rule's scores are in other units

    images = data / "test"
    out = images / "predicted"  # inside the images' folder
    argv = ["--checkpoint", str(checkpoint), "--images", str(images), "--out", str(out), "--batch_size", "3"]
    predict.main(argv)
    first = {path.relative_to(out): path.read_bytes() for path in out.rglob("*") if path.is_file()}
    assert len(first) == 1 + 2 * 8 and not (out / ".predict-partial").exists()
    predict.main(argv)  # the overlays of the first run are not scored again
    assert len(read_scores_csv(out / "predictions.csv")) == 8
    (images / "one" / "zz_broken.png").write_bytes(b"not an image")  # scored in the last batch
    with pytest.raises(DataError, match="zz_broken.png"):
        predict.main(argv)
    assert {path.relative_to(out): path.read_bytes() for path in out.rglob("*") if path.is_file()} == first
    with pytest.raises(DataError, match="no such folder or file"):
        predict.main(["--checkpoint", str(checkpoint), "--images", str(tmp_path / "nowhere"), "--out", str(out)])
    with pytest.raises(DataError, match="is a file; pass a folder"):
        predict.main(["--checkpoint", str(checkpoint), "--images", str(images), "--out", str(checkpoint)])


def test_a_checkpoint_trained_on_cuda_loaded_where_there_is_none_names_device_cpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("checks the message given where no CUDA device exists")
    data = digits_folder(tmp_path / "digits", n_test=2)
    config = folder_config(data, tmp_path, "gaussian")
    run(config)
    saved = torch.load(results_folder(config) / "checkpoints" / "digits.pt", weights_only=True)
    torch.save({**saved, "config": json.dumps({**json.loads(saved["config"]), "device": "cuda"})}, tmp_path / "gpu.pt")
    with pytest.raises(DetectorError, match="trained on cuda; pass device='cpu'"):
        load_detector(tmp_path / "gpu.pt")
    assert load_detector(tmp_path / "gpu.pt", device="cpu").config.device == "cpu"


def test_output_names_stay_distinct_when_stems_or_flattened_paths_collide():
    paths = ["/x/good/000.png", "/x/good/000.jpg", "/x/a__b/c.png", "/x/a/b__c.png", "/x/good/001.png"]
    names = predict.output_names(paths)
    assert names == ["good__000.png", "good__000.jpg", "a__b__c.png", "a__b__c.png-2", "good__001"]
    assert predict.output_names(["/d/one/a.png", "/d/two/a.png"]) == ["one__a", "two__a"]


def test_csv_fields_with_commas_quotes_and_newlines_read_back_unchanged():
    from report import csv_field

    texts = ["plain.png", "a,b.png", 'say "hi".png', "line\nbreak.png", "carriage\rreturn.png", '",",.png']
    line = ",".join(csv_field(text) for text in texts)
    assert next(csv.reader(io.StringIO(line))) == texts


def test_knn_with_fewer_fit_images_than_k_stops_with_a_message(tmp_path):
    data = digits_folder(tmp_path / "digits", n_train=2)
    result = subprocess.run([sys.executable, str(ROOT / "main.py"), "--method", "knn", "--dataset", "folder",
                             "--data_root", str(data), "--cache_dir", str(tmp_path / "cache"),
                             "--results_dir", str(tmp_path / "results")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--knn_k 2 needs at least 2 fit images" in result.stderr and "--val_fraction" in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where no CUDA device exists")
def test_predict_on_cuda_without_a_gpu_says_so_before_reading_the_checkpoint(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "predict.py"), "--checkpoint", str(tmp_path / "any.pt"),
                             "--images", str(tmp_path), "--out", str(tmp_path / "out"), "--device", "cuda"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "torch sees no CUDA device; use --device cpu" in result.stderr


def test_few_held_out_images_are_named(tmp_path, capsys):
    data = digits_folder(tmp_path / "digits", n_train=30, n_test=5)
    run(folder_config(data, tmp_path, "gaussian"))
    threshold_rule = json.loads((results_folder(folder_config(data, tmp_path, "gaussian")) / "results.json")
                                .read_text())["per_class"]["digits"]["threshold_rule"]
    assert "3 held-out normal training images" in threshold_rule
    assert "cannot show a false-positive rate" in threshold_rule
    assert "note: 'digits': 3 images cannot show" in capsys.readouterr().out
