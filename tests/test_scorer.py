"""Complexity scorers on real images made here with controlled complexity; checkpoints and backbones."""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from scipy.stats import spearmanr

from pipeline import scorer as S
from pipeline.decode import DecodeConfig, decode_image


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Up to 6 sessions share 2 cores here: one intra-op thread avoids spin-wait thrashing (10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def synthetic_image(shapes: int, seed: int, size: int = 224, texture: bool = False) -> Image.Image:
    """Return an RGB image: a flat background with ``shapes`` random shapes, or a dense noise texture."""
    rng = np.random.default_rng(seed)
    if texture:
        return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    img = Image.new("RGB", (size, size), tuple(int(c) for c in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(img)
    for _ in range(shapes):
        x0, y0 = rng.integers(0, size - 8, 2)
        w, h = rng.integers(6, max(8, size // 3), 2)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.rectangle if rng.random() < 0.5 else draw.ellipse)([int(x0), int(y0), int(x0 + w), int(y0 + h)],
                                                                  fill=colour)
    return img


def decoded(img: Image.Image, size: int = 224, fmt: str = "PNG") -> np.ndarray:
    """Return ``img`` encoded as ``fmt`` and decoded the way the pipeline decodes it."""
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return decode_image(buf.getvalue(), DecodeConfig(image_size=size)).pixels


def test_heuristic_orders_a_complexity_ladder():
    levels = [0, 1, 2, 4, 8, 16, 30, 60, 120]
    pixels, truth = [], []
    for level, shapes in enumerate(levels):
        for seed in range(3):
            pixels.append(decoded(synthetic_image(shapes, seed), fmt="JPEG" if seed % 2 else "PNG"))
            truth.append(level)
    for seed in range(3):
        pixels.append(decoded(synthetic_image(0, seed, texture=True)))
        truth.append(len(levels))
    scorer = S.HeuristicScorer()
    scores = scorer.score(np.stack(pixels))
    assert scores.dtype == np.float32 and scores.shape == (len(truth),)
    assert ((scores >= 0) & (scores <= 1)).all()
    assert spearmanr(scores, truth)[0] > 0.9
    flat, one, thirty, texture = scores[0], scores[3], scores[18], scores[-1]
    assert flat < one < thirty < texture
    assert flat == 0.0


def test_heuristic_is_deterministic_and_resolution_robust():
    scorer = S.HeuristicScorer()
    imgs = [synthetic_image(n, seed=n) for n in (3, 20, 50)]
    at224 = scorer.score(np.stack([decoded(i, 224) for i in imgs]))
    assert np.array_equal(at224, scorer.score(np.stack([decoded(i, 224) for i in imgs])))
    # The scorer resizes its input itself: a batch decoded at another encoder size scores about the same.
    at336 = scorer.score(np.stack([decoded(i.resize((336, 336), Image.BICUBIC), 336) for i in imgs]))
    assert np.abs(at224 - at336).max() < 0.05
    assert scorer.score(np.zeros((0, 224, 224, 3), np.uint8)).shape == (0,)
    assert 0 < scorer.gflops_per_image < 0.01
    assert scorer.identity["kind"] == "heuristic" and scorer.input_size == 128


def test_to_float_batch_resizes_and_normalises():
    pixels = np.random.default_rng(0).integers(0, 256, (2, 96, 96, 3), dtype=np.uint8)
    x = S.to_float_batch(pixels, 64)
    ref = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    ref = F.interpolate(ref, size=(64, 64), mode="bilinear", antialias=True, align_corners=False)
    ref = (ref - torch.tensor(S.IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(S.IMAGENET_STD).view(1, 3, 1, 1)
    assert x.shape == (2, 3, 64, 64) and torch.allclose(x, ref, atol=1e-6)
    with pytest.raises(ValueError, match="uint8 batch"):
        S.to_float_batch(pixels[0], 64)


def test_load_scorer_kinds(monkeypatch, tmp_path):
    assert S.load_scorer("none") is None
    assert S.load_scorer("heuristic").name == "heuristic-edge-density"
    with pytest.raises(ValueError, match="needs a checkpoint"):
        S.load_scorer("convnext")
    with pytest.raises(ValueError, match="unknown scorer kind"):
        S.load_scorer("magic")
    with pytest.raises(ValueError, match="takes no checkpoint"):
        S.load_scorer("heuristic", checkpoint="x.safetensors")
    monkeypatch.setattr(S, "DEFAULT_CHECKPOINT", tmp_path / "absent.safetensors")
    assert S.load_scorer("default").identity["kind"] == "heuristic"
    with pytest.raises(FileNotFoundError, match="train-complexity"):
        S.load_scorer("convnext", checkpoint=str(tmp_path / "absent.safetensors"))


def test_checkpoint_round_trip_gives_identical_scores(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = S.ComplexityNet("convnext_atto", bins=10).eval()
    with torch.no_grad():
        model.head.weight.normal_(std=0.5)  # a head that makes the scores differ between images
    path = str(tmp_path / "ic.safetensors")
    sha = S.save_checkpoint(model, {"input_size": 64, "training": {"data": "synthetic test images"}}, path)
    assert sha == hashlib.sha256(open(path, "rb").read()).hexdigest()
    assert json.load(open(tmp_path / "ic.json"))["backbone"] == "convnext_atto"

    scorer = S.load_scorer("convnext", checkpoint=path)
    pixels = np.stack([decoded(synthetic_image(n, n), 224) for n in (0, 10, 60)])
    with torch.no_grad():
        expected = model.expected_score(model(S.to_float_batch(pixels, 64))).numpy()
    got = scorer.score(pixels)
    assert np.array_equal(got, expected.astype(np.float32))
    assert np.ptp(got) > 0
    assert scorer.identity["sha256"] == sha and scorer.identity["input_size"] == 64
    assert scorer.identity["backbone"] == "convnext_atto" and scorer.identity["bins"] == 10
    # convnext_atto is 1.09 GFLOPs at 224 px (ENVIRONMENT.md); at 64 px about (64/224)^2 of it.
    assert scorer.gflops_per_image == pytest.approx(1.09 * (64 / 224) ** 2, rel=0.15)
    monkeypatch.setattr(S, "DEFAULT_CHECKPOINT", tmp_path / "ic.safetensors")
    assert S.load_scorer("default").identity["sha256"] == sha


def test_checkpoint_without_card_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "raw.safetensors"))
    with pytest.raises(ValueError, match="no ICAR card"):
        S.load_checkpoint(str(tmp_path / "raw.safetensors"))


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_backbone_weights_from_a_local_file(tmp_path, fmt):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(1)
    source = timm.create_model("convnext_atto", pretrained=False, num_classes=1000)  # an "ImageNet" checkpoint
    state = {f"module.{k}": v for k, v in source.state_dict().items()}
    path = tmp_path / f"w.{fmt}"
    if fmt == "pt":
        torch.save({"state_dict": state}, path)
    else:
        save_file(state, str(path))
    torch.manual_seed(2)
    model = S.ComplexityNet("convnext_atto", bins=5)
    info = S.load_backbone_weights(model.backbone, str(path))
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, source.state_dict()[k]), k
    assert "head.fc.weight" in info["ignored"] and info["loaded"] == len(model.backbone.state_dict())
    other = S.ComplexityNet("torchvision:mobilenet_v2", bins=5)
    with pytest.raises(ValueError, match="do not fit"):
        S.load_backbone_weights(other.backbone, str(path))


def test_other_backbones_plug_in():
    model = S.ComplexityNet("torchvision:mobilenet_v2", bins=7).eval()
    assert model.num_features == 1280
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 7)
    S.register_backbone_source("tiny", lambda arch: torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()))
    tiny = S.ComplexityNet("tiny:anything", bins=3)
    assert tiny.num_features == 4
    with pytest.raises(ValueError, match="unknown backbone source"):
        S.create_backbone("nowhere:x")
    with pytest.raises(ValueError, match="timm has no model"):
        S.create_backbone("convnext_gigantic_9000")
