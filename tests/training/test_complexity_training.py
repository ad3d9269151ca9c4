"""Training and evaluating a ComplexityNet end to end on real image files with controlled complexity."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from pipeline.training import complexity as T
from pipeline.model import scorer as S

SHAPES = [0, 1, 3, 6, 10, 15, 22, 30, 45, 60]


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Up to 6 sessions share 2 cores here: one intra-op thread avoids spin-wait thrashing (10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def synthetic_image(shapes: int, seed: int, size: int = 96) -> Image.Image:
    """Return a flat background with ``shapes`` random rectangles/ellipses."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (size, size), tuple(int(c) for c in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(img)
    for _ in range(shapes):
        x0, y0 = rng.integers(0, size - 6, 2)
        w, h = rng.integers(4, size // 3, 2)
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.rectangle if rng.random() < 0.5 else draw.ellipse)([int(x0), int(y0), int(x0 + w), int(y0 + h)],
                                                                  fill=fill)
    return img


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """100 images in two category folders; score = shape count / 60 (0-100 scale in the SAVOIAS-style file)."""
    root = tmp_path_factory.mktemp("ic")
    rows = []
    for i in range(100):
        shapes = SHAPES[i % len(SHAPES)]
        name = f"{'Flat' if i % 2 else 'Busy'}/{i:03d}.{'jpg' if i % 3 else 'png'}"
        (root / "images" / name).parent.mkdir(parents=True, exist_ok=True)
        synthetic_image(shapes, seed=i).save(root / "images" / name)
        rows.append((name, shapes / 60))
    (root / "images" / "Flat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    train, test = rows[:80], rows[80:]
    (root / "train.txt").write_text("".join(f"{n}  {s:.4f}\n" for n, s in train) + "Flat/broken.jpg 0.5\n")
    (root / "test.txt").write_text("# IC9600 layout\n" + "".join(f"{n}\t{s:.4f}\n" for n, s in test))
    (root / "test100.txt").write_text("".join(f"{n} {100 * s:.2f}\n" for n, s in test))
    return root


def test_read_labels_and_scale(tmp_path):
    f = tmp_path / "l.txt"
    f.write_text("a b.jpg 0.5\n\n# comment\nc.png\t1\n")
    assert T.read_labels(str(f)) == [("a b.jpg", 0.5), ("c.png", 1.0)]
    f.write_text("x.jpg 0.5\nx.jpg 0.6\n")
    with pytest.raises(ValueError, match="twice"):
        T.read_labels(str(f))
    f.write_text("x.jpg high\n")
    with pytest.raises(ValueError, match=r"l.txt:1"):
        T.read_labels(str(f))
    assert T.resolve_score_scale(np.array([0.0, 0.7]), None) == 1.0
    assert T.resolve_score_scale(np.array([3.0, 87.0]), None) == 100.0
    with pytest.raises(ValueError, match="score-scale"):
        T.resolve_score_scale(np.array([0.0, 250.0]), None)


def test_two_hot_expectation_is_exact():
    y = torch.rand(1000)
    for bins in (2, 5, 10):
        target = T.two_hot(y, bins)
        assert torch.allclose(target.sum(1), torch.ones(1000))
        assert torch.allclose(target @ S.bin_centres(bins), y, atol=1e-6)
        assert (target > 0).sum(1).max() <= 2


def test_loss_decreases_on_real_batches():
    torch.manual_seed(0)
    model = S.ComplexityNet("convnext_atto", bins=10)
    pixels = np.stack([np.asarray(synthetic_image(s, i, 64)) for i, s in enumerate(SHAPES)])
    y = torch.tensor([s / 60 for s in SHAPES])
    x = S.to_float_batch(pixels, 64)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        loss, parts = T.complexity_loss(model(x), y, model.centres, mse_weight=1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0]


def _config(dataset, out, **kw):
    base = dict(images=str(dataset / "images"), train_labels=str(dataset / "train.txt"), output=str(out),
                val_labels=str(dataset / "test.txt"), backbone="convnext_atto", input_size=64, decode_size=64,
                epochs=2, batch_size=16, lr=1e-3, seed=0, device="cpu", progress=False, data_note="synthetic shapes")
    base.update(kw)
    return T.TrainConfig(**base)


def test_train_resume_and_evaluate_end_to_end(dataset, tmp_path, monkeypatch):
    out = tmp_path / "run"
    summary = T.train_complexity(_config(dataset, out))
    assert summary["n_train"] == 80 and summary["n_val"] == 20 and summary["skipped"] == 1
    history = json.load(open(out / "history.json"))
    assert [h["epoch"] for h in history] == [1, 2]
    assert all(np.isfinite(h["train_loss"]) and "val_srcc" in h for h in history)
    card = json.load(open(out / "best.json"))
    assert card["backbone"] == "convnext_atto" and card["bins"] == 10 and card["input_size"] == 64
    assert card["training"]["data"] == "synthetic shapes" and card["training"]["skipped"][0]["name"] == "Flat/broken.jpg"
    assert card["metrics"]["best_epoch"] == summary["best_epoch"]
    assert {"torch", "timm", "icar"} <= set(card["versions"]) and card["seed"] == 0

    # The checkpoint loads back as a scorer with identical outputs to the trained model's predictions.
    scorer = S.load_scorer("convnext", checkpoint=str(out / "best.safetensors"))
    pairs = T.read_labels(str(dataset / "test.txt"))
    pixels, kept, _ = T.load_images(str(dataset / "images"), [n for n, _ in pairs], 64)
    model, _, _ = S.load_checkpoint(str(out / "best.safetensors"))
    assert np.array_equal(scorer.score(pixels), T.predict(model, pixels, 64, 256, "cpu"))  # same batches: bit-identical
    best_val = summary["val"]
    from pipeline.metrics import complexity_metrics

    again = complexity_metrics(scorer.score(pixels), np.array([pairs[i][1] for i in kept]))
    assert again["plcc"] == pytest.approx(best_val["plcc"], abs=1e-5)

    # Resume: a run that crashes during epoch 2 and is re-run ends with the same weights as an uninterrupted one.
    crashed = tmp_path / "crashed"
    real_predict = T.predict
    calls = {"n": 0}

    def predict_then_crash(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated preemption")
        return real_predict(*args, **kwargs)

    monkeypatch.setattr(T, "predict", predict_then_crash)
    with pytest.raises(KeyboardInterrupt):
        T.train_complexity(_config(dataset, crashed))
    monkeypatch.setattr(T, "predict", real_predict)
    assert len(json.load(open(crashed / "history.json"))) == 1
    T.train_complexity(_config(dataset, crashed))
    a = torch.load(out / "train_state.pt", weights_only=True)["model"]
    b = torch.load(crashed / "train_state.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="other settings"):
        T.train_complexity(_config(dataset, crashed, lr=5e-4))

    # Evaluation job, per category, with a fitted map for RMSE/MAE, on 0-100 labels (auto-scaled).
    from jobs import eval_complexity

    ev = tmp_path / "eval"
    rc = eval_complexity.main(["--scorer", "convnext", "--checkpoint", str(out / "best.safetensors"),
                               "--images", str(dataset / "images"), "--labels", str(dataset / "test100.txt"),
                               "--per-category", "--decode-size", "64", "--output", str(ev), "--no-progress"])
    assert rc == 0
    result = json.load(open(ev / "metrics.json"))
    assert [r["group"] for r in result["metrics"]] == ["Busy", "Flat"] and result["score_scale"] == 100.0
    assert result["mean_over_categories"]["srcc"] == pytest.approx(
        np.mean([r["srcc"] for r in result["metrics"]]))
    assert result["images_per_s"] > 0
    rows = list(csv.DictReader(open(ev / "metrics.csv")))
    assert [r["group"] for r in rows] == ["Busy", "Flat", "mean"]
    assert len(list(csv.DictReader(open(ev / "predictions.csv")))) == 20


def test_heuristic_evaluation_with_fitted_map(dataset, tmp_path):
    from jobs import eval_complexity

    ev = tmp_path / "eval"
    rc = eval_complexity.main(["--scorer", "heuristic", "--images", str(dataset / "images"),
                               "--labels", str(dataset / "test.txt"), "--fit-labels", str(dataset / "train.txt"),
                               "--output", str(ev), "--no-progress"])
    assert rc == 0
    m = json.load(open(ev / "metrics.json"))
    assert m["metrics"]["srcc"] > 0.8  # edge density orders shape counts
    assert m["metrics"]["rmse_fitted"] < m["metrics"]["rmse"]  # the raw edge density is not on the label scale
    assert "not calibrated" in m["notes"]
    rc = eval_complexity.main(["--scorer", "heuristic", "--images", str(dataset / "images"),
                               "--labels", str(dataset / "test.txt"), "--fit-labels", str(dataset / "test.txt"),
                               "--output", str(ev), "--no-progress"])
    assert rc == 2  # fitting on the test labels is refused


def test_train_cli_and_bad_input(dataset, tmp_path, capsys):
    from jobs import train_complexity

    rc = train_complexity.main(["--images", str(dataset / "images"), "--train-labels", str(dataset / "train.txt"),
                                "--val-fraction", "0.2", "--input-size", "64", "--decode-size", "64", "--epochs", "1",
                                "--batch-size", "32", "--output", str(tmp_path / "cli"), "--no-progress"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["n_val"] == 16 and (tmp_path / "cli" / "best.safetensors").exists()
    rc = train_complexity.main(["--images", str(tmp_path), "--train-labels", str(dataset / "train.txt"),
                                "--output", str(tmp_path / "bad"), "--no-progress"])
    assert rc == 2 and "not under" in capsys.readouterr().err
