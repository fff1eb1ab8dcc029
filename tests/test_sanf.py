"""SANF-AD detector (model.SANFModel) and the main.py pipeline on real data."""

import dataclasses
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from sklearn.covariance import LedoitWolf

from baselines import ViewWhitening
from config import make_config
from conftest import kept_the_best_measurement, not_below_baseline
from datasets import load_tasks
from main import results_folder, run
from model import DetectorError, GaussianDetector, SANFDetector, SANFModel, load_detector, normalise_tokens
from train import ModuleWeights, TrainingError, keep_best_epoch, train_sanf

ROOT = __import__("conftest").ROOT


def small_model(fusion: bool = True, token_dim: int = 0) -> SANFModel:
    return SANFModel(dim=16, n_tokens=3, n_layers=2, hidden=8, heads=2, fusion=fusion, token_dim=token_dim).double()


def correlated_tokens(count: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(16, 16, generator=generator, dtype=torch.float64)
    semantic = torch.randn(count, 16, generator=generator, dtype=torch.float64) @ mixing + 5.0
    patches = semantic.unsqueeze(1) + 0.1 * torch.randn(count, 3, 16, generator=generator, dtype=torch.float64)
    return semantic, patches


def test_token_normalisations_by_hand():
    tokens = torch.tensor([[[3.0, -4.0], [0.0, 9.0]]])
    assert torch.equal(normalise_tokens(tokens, "none"), tokens)
    assert torch.allclose(normalise_tokens(tokens, "l2"), torch.tensor([[[0.6, -0.8], [0.0, 1.0]]]))
    root = torch.tensor([3.0 ** 0.5, -2.0]) / (3.0 + 4.0) ** 0.5
    assert torch.allclose(normalise_tokens(tokens, "power"), torch.stack([root, torch.tensor([0.0, 1.0])])[None])


def test_normalised_features_make_the_baselines_blind_to_image_contrast():
    rng = np.random.default_rng(0)
    train = {"sem": torch.from_numpy(rng.random((200, 8), dtype=np.float32))}
    test = torch.from_numpy(rng.random((5, 8), dtype=np.float32))
    scores = {}
    for norm in ("l2", "none"):
        detector = GaussianDetector(make_config("demo", method="gaussian", token_norm=norm))
        detector.fit(train, None, "toy")
        scores[norm] = detector.score({"sem": test})[0], detector.score({"sem": 7.0 * test})[0]
    np.testing.assert_allclose(scores["l2"][0], scores["l2"][1], rtol=1e-6)
    assert not np.allclose(scores["none"][0], scores["none"][1])  # the same check does see raw contrast


@pytest.mark.parametrize("token_dim", [0, 8])
def test_preprocessing_whitens_the_training_tokens(token_dim):
    model = small_model(token_dim=token_dim)
    semantic, _ = correlated_tokens(4000)
    model.fit_preprocessing(semantic)
    whitened = model.preprocess(semantic)
    assert whitened.shape == (4000, token_dim or 16)
    identity = torch.eye(token_dim or 16, dtype=torch.float64)
    assert torch.allclose(whitened.mean(dim=0), torch.zeros(token_dim or 16, dtype=torch.float64), atol=1e-8)
    shrunk = torch.from_numpy(LedoitWolf().fit(semantic.numpy()).covariance_)
    assert torch.allclose(model.whitening.T @ shrunk @ model.whitening, identity, atol=1e-8)
    # the shrinkage is small with 4000 samples: the sample covariance is whitened too, nearly
    assert torch.allclose(torch.cov(whitened.T), identity, atol=0.25)


def test_untrained_nll_is_the_shrunk_gaussian_mahalanobis_distance():
    model = small_model()
    semantic, patches = correlated_tokens(500)
    model.fit_preprocessing(semantic)
    nll = model.anomaly_score(semantic[:7], patches[:7], "nll")
    mahalanobis = model.preprocess(semantic[:7]).pow(2).sum(dim=1)
    assert torch.allclose(nll, 0.5 * mahalanobis / 16, atol=1e-9)  # the flow starts as the identity
    assert torch.allclose(model.anomaly_score(semantic[:7], patches[:7], "z2"), mahalanobis / 16, atol=1e-9)


@pytest.mark.parametrize("context", ["full", "half"])
def test_flow_on_leading_axes_log_det_matches_autograd_and_leaves_the_rest(context):
    """flow_channels k = 8 of 16: z's last D - k channels are the whitened token's; log|det dz/dy| of the whole map
    (whitening included) equals the model's log-det plus log|det W|, against autograd's full Jacobian."""
    model = SANFModel(dim=16, n_tokens=3, n_layers=2, hidden=8, heads=2, context=context, flow_channels=8).double()
    semantic, patches = correlated_tokens(300)
    model.fit_preprocessing(semantic, patches)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.flow.parameters():
            parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    sample, context_tokens = semantic[:3], patches[:3]
    z, log_det = model.latent(sample, context_tokens)
    whitened = model.preprocess(sample)
    assert torch.equal(z[:, 8:], whitened[:, 8:]) and not torch.allclose(z[:, :8], whitened[:, :8])
    whitening_log_det = torch.linalg.slogdet(model.whitening)[1]
    for row in range(3):
        jacobian = torch.autograd.functional.jacobian(
            lambda y: model.latent(y[None], context_tokens[row:row + 1])[0][0], sample[row])
        torch.testing.assert_close(torch.linalg.slogdet(jacobian)[1], log_det[row] + whitening_log_det)
    nll = model.nll_per_dim(sample, context_tokens)
    torch.testing.assert_close(nll, (0.5 * z.pow(2).sum(dim=1) - log_det) / 16)


def test_flow_channels_beyond_the_token_width_are_refused():
    with pytest.raises(ValueError, match="flow_channels .17. cannot exceed the 16 token channels"):
        SANFModel(dim=16, n_tokens=3, n_layers=2, hidden=8, heads=2, flow_channels=17)


def test_training_lowers_the_nll_and_fusion_reads_the_patches():
    config = make_config("demo", epochs=5, batch_size=50, lr=1e-3, hidden=8, heads=2, n_flow_layers=2)
    semantic, patches = correlated_tokens(400)
    features = {"sem": semantic.float(), "patches": patches.float()}
    model = SANFModel(16, 3, n_layers=2, hidden=8, heads=2)
    model.fit_preprocessing(features["sem"])
    before = model.nll_per_dim(features["sem"], features["patches"]).mean().item()
    info = train_sanf(model, features, None, config, "toy")
    after = model.nll_per_dim(features["sem"], features["patches"]).mean().item()
    assert after < before and info["curve"][-1]["train_loss"] == pytest.approx(after, abs=0.05)
    assert info["kept_epoch"] == 5 and len(info["curve"]) == 5  # no held-out images: the last epoch, as the paper
    shuffled = features["patches"][torch.randperm(400)]
    with torch.no_grad():
        assert not torch.allclose(model.nll_per_dim(features["sem"], features["patches"]),
                                  model.nll_per_dim(features["sem"], shuffled))


def test_non_finite_features_and_loss_stop_training(monkeypatch):
    config = make_config("demo", epochs=1, batch_size=10, hidden=8, heads=2, n_flow_layers=2)
    semantic, patches = correlated_tokens(20)
    features = {"sem": semantic.float(), "patches": patches.float()}
    model = SANFModel(16, 3, n_layers=2, hidden=8, heads=2)
    nll_per_dim = model.nll_per_dim  # a NaN loss that still has a gradient, as a diverging flow's has
    monkeypatch.setattr(model, "nll_per_dim", lambda *args: nll_per_dim(*args) * float("nan"))
    with pytest.raises(TrainingError, match="non-finite loss at epoch 1, batch 1 of 'toy'.*lower --lr"):
        train_sanf(model, features, None, config, "toy")
    features["sem"][3, 0] = float("inf")
    with pytest.raises(TrainingError, match="non-finite features; delete this run.s feature cache folder"):
        SANFDetector(config).fit(features, None, "toy")


class _Weight(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.value = torch.nn.Parameter(torch.zeros(1))


@pytest.mark.parametrize("held_out_curve, kept", [([1.0, 1.5, 2.0, 3.0], 0), ([1.0, 0.9, 0.7, 0.8], 2),
                                                  ([1.0, 0.5, float("nan"), 0.5], 1)])
def test_the_epoch_with_the_lowest_held_out_nll_is_kept_epoch_0_included(held_out_curve, kept):
    module = _Weight()
    measured = iter(held_out_curve)

    def run_epoch(epoch: int):
        module.value.data.fill_(float(epoch))  # the weights after epoch e hold e
        yield 0.0

    result = keep_best_epoch(ModuleWeights(module), 3, run_epoch, lambda: next(measured), "toy")
    assert result["kept_epoch"] == kept and module.value.item() == kept
    assert [r["epoch"] for r in result["curve"]] == [0, 1, 2, 3]
    assert result["held_out_nll"] == held_out_curve[kept]


def test_patience_stops_once_the_held_out_nll_stops_improving():
    module = _Weight()
    measured = iter([1.0, 0.8, 0.9, 0.85, 0.7, 0.6])
    epochs_run = []

    def run_epoch(epoch: int):
        epochs_run.append(epoch)
        module.value.data.fill_(float(epoch))
        yield 0.0

    result = keep_best_epoch(ModuleWeights(module), 5, run_epoch, lambda: next(measured), "toy", patience=2)
    assert epochs_run == [1, 2, 3] and result["kept_epoch"] == 1 and module.value.item() == 1


def test_measurements_within_an_epoch_keep_a_part_and_stop_after_a_fraction_of_an_epoch():
    """4 measurements per epoch: the weights after part p of epoch e hold e - 1 + p / 4. A flow that only
    worsens stops after its first quarter epoch (patience 1) and keeps the start; one that improves until
    1.5 keeps the weights of that measurement and stops at 1.75."""
    for held_out_curve, kept, parts_run in (([1.0, 1.1, 1.2], 0, 1), ([1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.45],
                                                                       1.5, 7)):
        module, measured, positions = _Weight(), iter(held_out_curve), []

        def run_epoch(epoch: int):
            for part in range(1, 5):
                positions.append(epoch - 1 + part / 4)
                module.value.data.fill_(positions[-1])
                yield 0.0

        result = keep_best_epoch(ModuleWeights(module), 3, run_epoch, lambda: next(measured), "toy", patience=1,
                                 checks_per_epoch=4)
        assert len(positions) == parts_run and result["kept_epoch"] == kept and module.value.item() == kept
        assert [r["epoch"] for r in result["curve"]] == [0, *positions]


def test_held_out_measurements_do_not_change_the_training_trajectory():
    """With patience 0 every epoch runs; measuring 4 times per epoch must leave the weights at each epoch's end
    as measuring once does (same batches, no random draws, no state change), so the held-out NLL at
    positions 1, 2, 3 is the same either way."""
    semantic, patches = correlated_tokens(300)
    features = {"sem": semantic.float(), "patches": patches.float()}
    fit = {key: value[:240] for key, value in features.items()}
    held_out = {key: value[240:] for key, value in features.items()}
    curves = {}
    for checks in (1, 4):
        config = make_config("demo", epochs=3, batch_size=20, lr=1e-3, hidden=8, heads=2, n_flow_layers=2,
                             patience=0, held_out_checks=checks)
        torch.manual_seed(0)  # the subnets' initial weights
        model = SANFModel(16, 3, n_layers=2, hidden=8, heads=2)
        model.fit_preprocessing(fit["sem"])
        curve = train_sanf(model, fit, held_out, config, "toy")["curve"]
        curves[checks] = {record["epoch"]: record["held_out_nll"] for record in curve}
    assert sorted(curves[4]) == [0, *(k / 4 for k in range(1, 13))]
    for epoch in (0, 1, 2, 3):
        assert curves[4][epoch] == curves[1][epoch]


def test_demo_end_to_end_writes_results_and_rescores_from_checkpoints(tmp_path):
    overrides = dict(classes="0,1,7", max_train_per_class=40, epochs=2, cache_dir=str(tmp_path / "cache"),
                     results_dir=str(tmp_path / "results"))
    payload = run(make_config("demo", **overrides))
    folder = results_folder(make_config("demo", **overrides))
    assert folder.name.startswith("digits-tf_efficientnet_lite0-sanf-caff-")
    stored = json.loads((folder / "results.json").read_text())
    assert stored["complete"] and list(stored["per_class"]) == ["0", "1", "7"]
    assert stored["config"]["epochs"] == 2 and "test set" in stored["selection"]
    assert stored["mean"]["image_auroc"] == pytest.approx(np.mean([m["image_auroc"] for m in stored["per_class"].values()]))
    gaussian = run(make_config("demo", method="gaussian", **overrides))["per_class"]
    tasks = {task.name: task for task in load_tasks(make_config("demo", **overrides))}
    for name, metrics in payload["per_class"].items():  # SANF starts as this Gaussian and keeps its best epoch
        assert kept_the_best_measurement(metrics) and metrics["n_held_out"] == 4, metrics["curve"]
        assert not_below_baseline(metrics["image_auroc"], gaussian[name]["image_auroc"], tasks[name].test_labels), name
    table = (folder / "results.md").read_text()
    assert table.splitlines()[0] == "| method | 0 | 1 | 7 | mean |"
    assert all((folder / "figures" / f"scores_{name}.png").stat().st_size > 1000 for name in ("0", "1", "7"))
    rows = (folder / "scores.csv").read_text().splitlines()
    assert rows[0] == "task,path,label,score" and len(rows) == 1 + 3 * 899
    rescored = run(make_config("demo", eval_only=True, **overrides))
    for name in ("0", "1", "7"):
        assert rescored["per_class"][name]["image_auroc"] == payload["per_class"][name]["image_auroc"]
    # a score-affecting setting other than the checkpoint's: one line naming it, rc 2
    for flag, value in (("--token_norm", "l2"), ("--patch_grid", "3")):
        result = cli("--eval_only", "--classes", "0,1,7", "--max_train_per_class", "40", "--epochs", "2",
                     flag, value, "--cache_dir", str(tmp_path / "cache"), "--results_dir", str(tmp_path / "results"),
                     cwd=tmp_path)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert result.stderr.strip().count("\n") == 0 and f"{flag[2:]} (checkpoint" in result.stderr


def cli(*argv: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "main.py"), *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("argv, message", [
    (["--dataset", "cifar10", "--data_root", "/nonexistent/cifar"], "does not exist"),
    (["--classes", "eleven"], "unknown class eleven"),
    (["--weights", "/nonexistent/w.pth"], "does not exist"),
])
def test_bad_input_ends_with_one_line_and_no_files(argv, message, tmp_path):
    result = cli(*argv, "--cache_dir", "cache", "--results_dir", "results", cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and message in result.stderr
    assert not (tmp_path / "results").exists()


def test_a_bad_choice_is_an_argparse_error(tmp_path):
    result = cli("--dataset", "imagenet", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "invalid choice: 'imagenet'" in result.stderr and not (tmp_path / "results").exists()


def test_corrupt_image_ends_with_one_line_naming_it_and_no_trusted_cache(tmp_path):
    from PIL import Image

    data = tmp_path / "data"
    for name in ("train/good/0.png", "train/good/1.png", "test/good/0.png", "test/bad/0.png"):
        (data / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32), (90, 120, 30)).save(data / name)
    (data / "train/good/2.png").write_bytes(b"not a png")
    result = cli("--dataset", "folder", "--data_root", str(data), "--cache_dir", "cache", "--results_dir", "results",
                 cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "2.png" in result.stderr
    assert not (tmp_path / "results").exists()
    assert not [path for path in (tmp_path / "cache").rglob("*.json") if not path.name.endswith(".progress.json")]


def test_cifar10_real_data_reaches_auroc(cifar10_root, tmp_path):
    """Real CIFAR-10 JPEG copy, a quick subset: 200 training images per class, 500 test images."""
    config = make_config("sanf_cifar10_lite0", data_root=str(cifar10_root), classes="automobile,ship",
                         max_train_per_class=200, max_test=500, epochs=2, cache_dir=str(tmp_path / "cache"),
                         results_dir=str(tmp_path / "results"))
    payload = run(config)
    gaussian = run(dataclasses.replace(config, method="gaussian"))
    labels = load_tasks(config)[0].test_labels
    for name, metrics in payload["per_class"].items():  # SANF starts as this Gaussian and keeps its best epoch
        assert kept_the_best_measurement(metrics), metrics["curve"]
        assert not_below_baseline(metrics["image_auroc"], gaussian["per_class"][name]["image_auroc"], labels), name


def test_measurement_positions_follow_the_parts_actually_trained():
    """Without held-out images there is nothing to measure within an epoch: one record per epoch. With
    fewer batches than measurements asked for, each batch is a part and positions say so (2 batches: halves)."""
    semantic, patches = correlated_tokens(60)
    features = {"sem": semantic.float(), "patches": patches.float()}
    fit = {key: value[:40] for key, value in features.items()}
    held_out = {key: value[40:] for key, value in features.items()}
    for held, expected in ((None, [1, 2]), (held_out, [0, 0.5, 1.0, 1.5, 2.0])):
        config = make_config("demo", epochs=2, batch_size=20, hidden=8, heads=2, n_flow_layers=2, patience=0,
                             held_out_checks=4)
        model = SANFModel(16, 3, n_layers=2, hidden=8, heads=2)
        model.fit_preprocessing(fit["sem"])
        info = train_sanf(model, fit, held, config, "toy")
        assert [record["epoch"] for record in info["curve"]] == expected and info["epochs_run"] == 2


def test_half_context_with_texture_tokens_of_another_width_is_refused_naming_the_fix():
    from config import ConfigError

    with pytest.raises(ConfigError, match="--caff_context full"):
        SANFModel(dim=16, n_tokens=4, n_layers=1, hidden=8, heads=2, context="half", texture_dim=8)
    SANFModel(dim=16, n_tokens=4, n_layers=1, hidden=8, heads=2, context="full", texture_dim=8)


@pytest.mark.parametrize("shrinkage", [0.0, 0.3])
def test_gaussian_baseline_is_the_shrunk_mahalanobis_distance_of_numpy_and_sklearn(shrinkage):
    """Ledoit-Wolf (shrinkage 0): sklearn's own squared Mahalanobis distance; fixed s: numpy's
    (x - mu)^T inv((1 - s) S + s tr(S) / D I) (x - mu) with the unbiased sample covariance S."""
    from baselines import GaussianScorer

    train, test = correlated_tokens(300)[0].numpy(), correlated_tokens(40, seed=5)[0].numpy()
    scores = GaussianScorer(shrinkage).fit(torch.from_numpy(train)).score(torch.from_numpy(test)).double().numpy()
    if shrinkage == 0:
        expected = LedoitWolf().fit(train).mahalanobis(test)
    else:
        sample = np.cov(train, rowvar=False)
        covariance = (1 - shrinkage) * sample + shrinkage * np.trace(sample) / len(sample) * np.eye(len(sample))
        centred = test - train.mean(axis=0)
        expected = np.einsum("ij,jk,ik->i", centred, np.linalg.inv(covariance), centred)
    np.testing.assert_allclose(scores, expected, rtol=1e-5)


def test_pca_whitening_keeps_the_leading_principal_axes():
    """token_dim 8 of 16: W's columns are the 8 eigenvectors of the shrunk covariance with the largest
    eigenvalues, each divided by the square root of its eigenvalue (up to sign)."""
    model = small_model(token_dim=8)
    semantic, _ = correlated_tokens(4000)
    model.fit_preprocessing(semantic)
    eigenvalues, eigenvectors = np.linalg.eigh(LedoitWolf().fit(semantic.numpy()).covariance_)
    leading = eigenvectors[:, ::-1][:, :8] / np.sqrt(eigenvalues[::-1][:8])
    whitening = model.whitening.numpy()
    np.testing.assert_allclose(np.abs(whitening.T @ leading / np.linalg.norm(leading, axis=0) ** 2), np.eye(8),
                               atol=1e-6)


AUTO_SETTINGS = dict(epochs=3, batch_size=50, lr=1e-3, hidden=8, heads=2, n_flow_layers=2, token_norm="none")


def _fitted(context: str, fit: dict, held: dict, **settings) -> SANFDetector:
    detector = SANFDetector(make_config("demo", caff_context=context, **{**AUTO_SETTINGS, **settings}))
    detector.fit(fit, held, "toy")
    return detector


def test_caff_context_auto_keeps_the_reading_with_the_lower_held_out_nll_and_its_checkpoint_scores_alike(tmp_path):
    semantic, patches = correlated_tokens(300)  # texture tokens as wide as the semantic token: both readings apply
    fit = {"sem": semantic[:250].float(), "patches": patches[:250].float()}
    held = {"sem": semantic[250:].float(), "patches": patches[250:].float()}
    test_semantic, test_patches = correlated_tokens(40, seed=1)
    test = {"sem": test_semantic.float(), "patches": test_patches.float()}
    alone = {context: _fitted(context, fit, held) for context in ("full", "half")}  # each reading trained by itself
    nll = {context: detector.info["held_out_nll"] for context, detector in alone.items()}
    assert abs(nll["half"] - nll["full"]) > 1e-3  # the two readings train to different densities
    chosen = min(nll, key=nll.get)
    auto = _fitted("auto", fit, held)
    assert auto.info["caff_context_chosen"] == auto.info["caff_context"] == chosen
    assert auto.info["caff_context_held_out_nll"] == pytest.approx(nll)
    expected = alone[chosen].score(test)[0]
    assert np.allclose(auto.score(test)[0], expected, atol=1e-6)
    assert auto.threshold == pytest.approx(alone[chosen].threshold)
    auto.save(tmp_path / "auto.pt")
    assert np.allclose(load_detector(tmp_path / "auto.pt").score(test)[0], expected, atol=1e-6)
    # the checkpoint accepts auto or the reading it kept, and refuses the other reading
    for asked in ("auto", chosen):
        reloaded = load_detector(tmp_path / "auto.pt", dataclasses.replace(auto.config, caff_context=asked))
        assert np.allclose(reloaded.score(test)[0], expected, atol=1e-6)
    other = "half" if chosen == "full" else "full"
    with pytest.raises(DetectorError, match=f"caff_context \\(checkpoint kept '{chosen}', asked '{other}'\\)"):
        load_detector(tmp_path / "auto.pt", dataclasses.replace(auto.config, caff_context=other))


@pytest.mark.parametrize("case", ["narrow texture", "nothing held out", "no fusion"])
def test_caff_context_auto_trains_only_the_papers_reading_where_it_cannot_choose(case):
    semantic, patches = correlated_tokens(300)
    if case == "narrow texture":  # an intermediate stage's width: the channel-half reading cannot apply
        patches = patches[..., :8]
    fit = {"sem": semantic[:250].float(), "patches": patches[:250].float()}
    held = None if case == "nothing held out" else {"sem": semantic[250:].float(), "patches": patches[250:].float()}
    settings = {"fusion": "none"} if case == "no fusion" else {}
    auto, full = _fitted("auto", fit, held, **settings), _fitted("full", fit, held, **settings)
    assert auto.info["caff_context"] == "full" and "caff_context_chosen" not in auto.info
    assert np.allclose(auto.score(fit)[0], full.score(fit)[0], atol=1e-6)


@pytest.mark.parametrize("held_out_nll, kept", [({"full": 0.5, "half": 0.5}, "full"),
                                                ({"full": math.nan, "half": 0.9}, "half"),
                                                ({"full": 0.7, "half": math.inf}, "full")])
def test_caff_context_auto_keeps_full_on_a_tie_and_never_a_non_finite_held_out_nll(monkeypatch, held_out_nll, kept):
    import model

    def trained(flow, tokens, held, config, label):
        return {"held_out_nll": held_out_nll[flow.context], "curve": [], "train_seconds": 1.0, "epochs_run": 0}

    monkeypatch.setattr(model, "train_sanf", trained)
    semantic, patches = correlated_tokens(120)
    fit = {"sem": semantic[:100].float(), "patches": patches[:100].float()}
    held = {"sem": semantic[100:].float(), "patches": patches[100:].float()}
    auto = _fitted("auto", fit, held)
    assert auto.info["caff_context"] == auto.info["caff_context_chosen"] == kept
    assert auto.info["caff_context_train_seconds"] == {"full": 1.0, "half": 1.0}


def test_a_checkpoint_from_before_caff_context_auto_adam_eps_and_lr_schedule_reads_as_it_was_trained(tmp_path):
    semantic, patches = correlated_tokens(300)
    fit = {"sem": semantic[:250].float(), "patches": patches[:250].float()}
    held = {"sem": semantic[250:].float(), "patches": patches[250:].float()}
    half = _fitted("half", fit, held)
    half.save(tmp_path / "half.pt")
    saved = torch.load(tmp_path / "half.pt", weights_only=True)
    meta = json.loads(saved["meta"])
    del meta["caff_context"]  # what a checkpoint written before --caff_context auto holds
    settings = json.loads(saved["config"])
    for name in ("adam_eps", "lr_schedule", "sub_epochs", "rotate_degrees"):  # torch's eps, a constant lr, no rotation
        del settings[name]
    torch.save({**saved, "meta": json.dumps(meta), "config": json.dumps(settings)}, tmp_path / "old.pt")
    old = load_detector(tmp_path / "old.pt")
    assert old.model.context == "half" and (old.config.adam_eps, old.config.lr_schedule) == (1e-8, "constant")
    assert np.allclose(old.score(held)[0], half.score(held)[0], atol=1e-6)


def test_the_task_line_names_the_caff_context_auto_kept_and_both_held_out_nlls():
    from main import _task_line

    metrics = {"image_auroc": 0.845, "kept_epoch": 3, "caff_context": "half", "caff_context_chosen": "half",
               "caff_context_held_out_nll": {"full": 0.4518, "half": 0.3366}, "fit_seconds": 9.0,
               "score_seconds": 0.1, "test_flagged_fraction": 0.26}
    line = _task_line("magnetic_tile", metrics)
    assert "CAFF context half (held-out NLL full 0.4518, half 0.3366)" in line and "kept epoch 3" in line


@pytest.mark.parametrize("count", [300, 9])  # more tokens per view than channels, and fewer (low-rank storage)
def test_per_view_whitening_is_each_views_shrunk_gaussian(count):
    """ViewWhitening against a brute-force reference: view v's tokens whitened by the inverse square root of their
    own Ledoit-Wolf covariance (scikit-learn's), and log|det W_v| from numpy's eigenvalues."""
    semantic, _ = correlated_tokens(3 * count)
    semantic = semantic + torch.arange(3 * count).remainder(3).unsqueeze(1).double() * torch.linspace(0, 4, 16)
    view = torch.arange(3 * count) % 3
    whitening = ViewWhitening(3, 16).double()
    whitening.fit(semantic, view)
    assert whitening.rank == min(16, count)
    whitened = whitening(semantic, view)
    for index in range(3):
        tokens = semantic[view == index].numpy()
        covariance = LedoitWolf().fit(tokens).covariance_
        eigenvalues, eigenvectors = np.linalg.eigh(covariance)
        reference = (tokens - tokens.mean(axis=0)) @ eigenvectors @ np.diag(eigenvalues ** -0.5) @ eigenvectors.T
        np.testing.assert_allclose(whitened[view == index].numpy(), reference, atol=1e-8)
        assert abs(whitening.log_det[index].item() + 0.5 * np.log(eigenvalues).sum()) < 1e-8


def test_per_view_log_det_matches_autograd():
    """With per-view statistics log|det dz/dy| of the whole map (the view's whitening included) equals autograd's,
    for a token of each view; and the views' NLLs differ by their whitenings' log-dets."""
    model = SANFModel(dim=16, n_tokens=3, n_layers=2, hidden=8, heads=2, context="half", views=2).double()
    semantic, patches = correlated_tokens(200)
    view = torch.arange(200) % 2
    model.fit_preprocessing(semantic * (1 + view.unsqueeze(1).double()), patches, view)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.flow.parameters():
            parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    sample, context_tokens, sample_view = semantic[:4], patches[:4], view[:4]
    z, log_det = model.latent(sample, context_tokens, view=sample_view)
    for row in range(4):
        jacobian = torch.autograd.functional.jacobian(
            lambda y: model.latent(y[None], context_tokens[row:row + 1], view=sample_view[row:row + 1])[0][0],
            sample[row])
        torch.testing.assert_close(torch.linalg.slogdet(jacobian)[1], log_det[row])
    with pytest.raises(ValueError, match="view index"):
        model.latent(sample, context_tokens)


def test_per_view_gaussian_scores_each_view_with_its_own_gaussian():
    """--view_statistics per_view: an image's score is the mean over its views v of the squared Mahalanobis distance
    of view v's token under the Ledoit-Wolf Gaussian of the fitted tokens of view v (numpy by hand); pooled, one
    Gaussian of all fitted tokens scores them differently."""
    semantic, _ = correlated_tokens(120 * 2)
    views = semantic.float().view(120, 2, 16)
    views[:, 1] = 3.0 * views[:, 1].flip(-1)  # view 1: another transform, another Gaussian
    fit, test = views[:100], views[100:]
    config = make_config("demo", method="gaussian", token_norm="none", view_statistics="per_view", train_views=2,
                         test_views=2)
    detector = GaussianDetector(config)
    detector.fit({"sem": fit.flatten(0, 1)}, None, "toy")
    scores = detector.score({"sem": test})[0]
    reference = np.zeros(len(test))
    for view in range(2):
        tokens = fit[:, view].double().numpy()
        precision = np.linalg.inv(LedoitWolf().fit(tokens).covariance_)
        centred = test[:, view].double().numpy() - tokens.mean(axis=0)
        reference += np.einsum("md,de,me->m", centred, precision, centred) / 2
    np.testing.assert_allclose(scores, reference, rtol=1e-4)
    pooled = GaussianDetector(make_config("demo", method="gaussian", token_norm="none", train_views=2, test_views=2))
    pooled.fit({"sem": fit.flatten(0, 1)}, None, "toy")
    assert not np.allclose(pooled.score({"sem": test})[0], reference, rtol=1e-2)
