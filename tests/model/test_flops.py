"""pipeline.model.flops: counted figures equal open_clip's published profile; cached figures equal fresh counts."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.io.schema import model_key
from pipeline.model import flops, models

TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 4, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ICAR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(flops, "_memory", {})
    return tmp_path / "cache" / "flops.json"


@pytest.fixture(scope="module")
def vit_b32():
    return models.load_clip("ViT-B-32", None, seed=0)


def test_vit_b32_matches_open_clip_profile_even_under_no_grad(vit_b32):
    x = torch.zeros(1, 3, 224, 224)
    assert flops.count_gflops(vit_b32.model.visual, x) == pytest.approx(8.82, abs=0.01)
    # a caller inside no_grad (the model is frozen and in eval): the MHA fast path must still not hide attention
    with torch.no_grad():
        assert flops.count_gflops(vit_b32.model.visual, x) == pytest.approx(8.82, abs=0.01)
    assert flops.text_gflops(vit_b32) == pytest.approx(5.96, abs=0.01)
    per_exit = flops.exit_gflops(vit_b32, [6, 9, 12])
    assert per_exit[12] == pytest.approx(flops.count_gflops(vit_b32.model.visual, x), rel=1e-9)
    # linear in blocks: ViT-B-32 ~ 0.23 + 0.716 k (ANCHORS.md)
    step = (per_exit[12] - per_exit[6]) / 6
    assert step == pytest.approx(0.716, abs=0.002)
    assert per_exit[9] - per_exit[6] == pytest.approx(3 * step, rel=1e-9)
    assert per_exit[6] == pytest.approx(0.23 + 6 * 0.716, abs=0.01)


def test_cached_figure_equals_fresh_count(private_cache):
    b = models.bundle_from_config(TINY, seed=0, name="tiny")
    first = flops.exit_gflops(b, [1, 2, 4])
    assert private_cache.exists()
    doc = json.loads(private_cache.read_text())
    assert len(doc) == 1 and model_key(b.identity) in next(iter(doc))
    flops._memory.clear()  # a new process: the figures come from the file
    cached = flops.exit_gflops(b, [1, 2, 4])
    fresh = flops.exit_gflops_from_profile(flops.count_tower_profile(b.model.visual, b.image_size), [1, 2, 4])
    assert cached == first == fresh
    assert fresh[4] == pytest.approx(flops.count_gflops(b.model.visual, torch.zeros(1, 3, 32, 32)), rel=1e-9)
    blocks = flops.tower_profile(b)["blocks"]
    assert len(set(blocks)) == 1 and blocks[0] > 0  # identical blocks cost the same
    assert fresh[2] - fresh[1] == pytest.approx(blocks[0], rel=1e-9)


def test_corrupt_cache_is_recounted(private_cache):
    private_cache.parent.mkdir(parents=True)
    private_cache.write_text("{not json")
    b = models.bundle_from_config(TINY, seed=0, name="tiny")
    assert flops.exit_gflops(b, [4])[4] > 0
    assert json.loads(private_cache.read_text())  # rewritten whole


def test_exit_outside_tower_is_refused():
    b = models.bundle_from_config(TINY, seed=0, name="tiny")
    with pytest.raises(ValueError, match="outside 1..4"):
        flops.exit_gflops(b, [5])


@pytest.mark.slow
def test_vit_l14_matches_open_clip_profile():
    """ViT-L-14 builds in ~10 s: the one test of the published 162.03 / 13.30 (175.33 together)."""
    b = models.load_clip("ViT-L-14", None, seed=0)
    image = flops.count_gflops(b.model.visual, torch.zeros(1, 3, 224, 224))
    assert image == pytest.approx(162.03, abs=0.01)
    assert flops.text_gflops(b) == pytest.approx(13.30, abs=0.01)
    per_exit = flops.exit_gflops(b, [12, 18, 24])
    assert per_exit[24] == pytest.approx(image, rel=1e-9)
    assert per_exit[12] == pytest.approx(0.31 + 6.737 * 12, abs=0.05)
