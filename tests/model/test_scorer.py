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

from pipeline.model import scorer as S
from pipeline.model.scorer_identity import describe_scorer, scorer_differences
from pipeline.io.decode import DecodeConfig, decode_image


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


def reference_edge_density(pixels: np.ndarray, input_size: int = 128, threshold: float = 0.1) -> np.ndarray:
    """Return the heuristic's definition computed the straightforward way (how HeuristicScorer once did it):
    resize all 3 channels, luminance, the normalised Sobel as a valid conv2d, magnitude, threshold, mean."""
    x = S.to_float_batch(pixels, input_size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    y = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(dim=1, keepdim=True)
    sobel_x = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 4.0
    g = F.conv2d(y, torch.stack([sobel_x, sobel_x.T]).unsqueeze(1))
    return (torch.sqrt(g[:, 0] ** 2 + g[:, 1] ** 2) > threshold).float().mean(dim=(1, 2)).numpy()


def smooth_random_batch(n: int, height: int, width: int, seed: int) -> np.ndarray:
    """Return random images with edges of every strength: random 12x12 colour grids resized bilinearly."""
    rng = np.random.default_rng(seed)
    return np.stack([np.asarray(Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8))
                                .resize((width, height), Image.BILINEAR)) for _ in range(n)])


@pytest.mark.parametrize("input_size,threshold", [(128, 0.1), (64, 0.1), (96, 0.05)])
def test_heuristic_matches_the_reference_definition(input_size, threshold):
    scorer = S.HeuristicScorer(input_size=input_size, edge_threshold=threshold)
    one_pixel = 1.0 / (input_size - 2) ** 2  # the score of one interior pixel
    batches = []
    for i, (h, w) in enumerate([(64, 64), (128, 128), (224, 224), (96, 160), (200, 72)]):  # up, same, down, mixed
        rng = np.random.default_rng(i)
        batches.append(rng.integers(0, 256, (3, h, w, 3), dtype=np.uint8))  # noise: nearly every pixel an edge
        batches.append(smooth_random_batch(6, h, w, seed=i))
        real = [synthetic_image(n, seed=n + i, size=max(h, w)) for n in (0, 2, 10, 40)]
        batches.append(np.stack([np.asarray(img.resize((w, h), Image.BICUBIC)) for img in real]))
    for size in (64, 128, 224):  # decoded exactly as the pipeline decodes, JPEG and PNG
        batches.append(np.stack([decoded(synthetic_image(n, seed=n), size, fmt) for n in (1, 5, 30, 90)
                                 for fmt in ("JPEG", "PNG")]))
    for pixels in batches:
        got, want = scorer.score(pixels), reference_edge_density(pixels, input_size, threshold)
        assert got.dtype == np.float32 and got.shape == want.shape
        # The same definition; float rounding may flip a pixel that sits exactly on the threshold.
        assert np.abs(got - want).max() <= 3 * one_pixel + 1e-7, (pixels.shape, got, want)
    # A batch larger than one internal chunk scores each image as it would alone.
    big = smooth_random_batch(40, 224, 224, seed=9)
    assert np.array_equal(scorer.score(big), np.concatenate([scorer.score(big[i:i + 1]) for i in range(40)]))


def test_heuristic_takes_read_only_batches_without_a_warning():
    import warnings

    pixels = smooth_random_batch(4, 64, 64, seed=0)
    pixels.flags.writeable = False  # what a Ray actor receives from the object store
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "NumPy array is not writable" would fail here
        scores = S.HeuristicScorer(input_size=64).score(pixels)
        x = S.to_float_batch(pixels, 32)
    assert np.array_equal(scores, S.HeuristicScorer(input_size=64).score(pixels.copy()))
    assert x.shape == (4, 3, 32, 32)


def test_heuristic_gflops_count_the_definition():
    # Unchanged by the faster implementation: what shipped routers recorded (224 px decoded, 128 px analysed).
    assert S.HeuristicScorer().gflops_per_image == pytest.approx(0.001941504, rel=1e-9)
    s = S.HeuristicScorer(input_size=128)
    core = 128 * 128 * (5 + 36 + 4) / 1e9  # luminance, two Sobel filters, magnitude and threshold
    assert s.estimate_gflops(128) == pytest.approx(core)  # no resize
    # Upsampling is plain bilinear, 4 taps per output pixel and channel, whatever the source size.
    assert s.estimate_gflops(64) == pytest.approx(core + 128 * 128 * 4 * 3 * 2 / 1e9)
    assert s.estimate_gflops(32) == s.estimate_gflops(64)
    # An antialiased downscale reads ~4·(S/128)² taps.
    assert s.estimate_gflops(256) == pytest.approx(core + 128 * 128 * 16 * 3 * 2 / 1e9)
    demo = S.HeuristicScorer(input_size=64, source_size=64)
    assert demo.gflops_per_image == pytest.approx(64 * 64 * 45 / 1e9)
    with pytest.raises(ValueError, match="edge_threshold"):
        S.HeuristicScorer(edge_threshold=0)
    with pytest.raises(ValueError, match="input_size"):
        S.HeuristicScorer(input_size=2)


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


def test_load_scorer_heuristic_options():
    s = S.load_scorer("heuristic", input_size=64, edge_threshold=0.05, source_size=64)
    assert s.identity["input_size"] == 64 and s.identity["edge_threshold"] == 0.05 and s.source_size == 64
    pixels = smooth_random_batch(3, 64, 64, seed=4)
    assert np.abs(s.score(pixels) - reference_edge_density(pixels, 64, 0.05)).max() <= 3 / 62 ** 2 + 1e-7
    with pytest.raises(ValueError, match="set the heuristic scorer"):
        S.load_scorer("convnext", checkpoint=str(S.DEFAULT_CHECKPOINT), input_size=64)


def test_scorer_for_model_resolves_the_demo_models_own_choice(monkeypatch, tmp_path):
    from pipeline.model import models

    choice = json.loads((models.DEMO_DIR / "scorer.json").read_text())
    assert choice == {"kind": "heuristic", "input_size": 64}  # the demo analyses its 64 px images at 64 px
    demo = S.scorer_for_model("demo", "default", image_size=64)  # the demo model decodes to 64 px
    assert demo.kind == "heuristic" and demo.input_size == 64 and demo.source_size == 64
    assert demo.gflops_per_image == pytest.approx(64 * 64 * 45 / 1e9)  # no resize at all
    # An explicit kind is taken as asked, its cost counted from the model's own input size.
    generic = S.scorer_for_model("demo", "heuristic", image_size=64)
    assert generic.input_size == 128 and generic.gflops_per_image == pytest.approx(generic.estimate_gflops(64))
    assert S.scorer_for_model("demo", "none") is None
    assert S.scorer_for_model("ViT-B-32", "heuristic").gflops_per_image == pytest.approx(0.001941504)
    # Another model's default is load_scorer's default; the demo's choice may name a checkpoint beside it.
    monkeypatch.setattr(S, "DEFAULT_CHECKPOINT", tmp_path / "absent.safetensors")
    assert S.scorer_for_model("ViT-B-32", "default").input_size == 128
    fake = tmp_path / "demo"
    fake.mkdir()
    (fake / "clip_config.json").write_text((models.DEMO_DIR / "clip_config.json").read_text())
    monkeypatch.setattr(models, "DEMO_DIR", fake)
    (fake / "scorer.json").write_text(json.dumps({"kind": "convnext", "checkpoint": "scorer.safetensors"}))
    with pytest.raises(FileNotFoundError, match=str(fake / "scorer.safetensors")):
        S.scorer_for_model("demo", "default")
    (fake / "scorer.json").write_text(json.dumps({"kind": "heuristic", "size": 64}))
    with pytest.raises(ValueError, match="scorer.json must hold kind"):
        S.scorer_for_model("demo", "default")


def test_scorer_differences_compare_what_defines_the_scores():
    h = S.HeuristicScorer(input_size=64).identity
    assert scorer_differences(h, {**h, "name": "other", "checkpoint": "/x"}) == []
    assert scorer_differences(h, S.HeuristicScorer().identity) == ["input_size"]
    assert scorer_differences(h, S.HeuristicScorer(64, 0.2).identity) == ["edge_threshold"]
    trained = {"kind": "convnext", "backbone": "b", "sha256": "s", "bins": 10, "input_size": 64}
    assert scorer_differences(trained, {**trained, "sha256": "t"}) == ["sha256"]
    assert "64 px" in describe_scorer(h) and "sha256 s" in describe_scorer(trained)


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
