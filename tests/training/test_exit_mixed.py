"""Exit heads trained for the index they live in: the mixed-gallery loss, its recall and the epoch it selects."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from pipeline.model import encoder as enc
from pipeline.model import models
from pipeline.training import exits as et
from pipeline.training.distributed import Dist
from pipeline.training.exit_step import HeadTrainer, exit_loss_shares, exit_losses
from pipeline.io.storage import safetensors_metadata
from pipeline.training.recall import (calibrated_penalty, caption_groups, choose_exit_calibration, evaluate_embeddings,
                                      mixed_gallery_recall, mixed_margins, mixed_score, recall_table)

TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 4, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random CLIP stored as a model directory (clip_config.json + clip.safetensors), like the demo."""
    d = tmp_path_factory.mktemp("tiny-model")
    b = models.bundle_from_config(TINY, seed=0)
    (d / "clip_config.json").write_text(json.dumps({"model_name": "tiny", "model_cfg": TINY}))
    save_file({k: v.contiguous() for k, v in b.model.state_dict().items()}, str(d / "clip.safetensors"))
    return str(d)


def _unit(*shape, seed):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _trainer(model_dir):
    bundle = models.load_clip(model_dir)
    heads = enc.ExitHeads.for_bundle(bundle, [1, 2, 4])
    return HeadTrainer(heads, 3.0, True, 4), bundle.model.visual.transformer.width


def test_mixed_gallery_loss_sees_full_depth_images_of_other_captions(model_dir):
    trainer, width = _trainer(model_dir)
    feats = {e: torch.randn(8, width, generator=torch.Generator().manual_seed(e)) for e in (1, 2)}
    text, full = _unit(8, 32, seed=10), _unit(8, 32, seed=11)
    # full-depth image j made the best match of caption j + 1: a strong negative for that caption's exit rows
    rivals = F.normalize(full + 4 * text.roll(-1, dims=0), dim=-1)
    with torch.no_grad():  # distillation off: any change comes from the contrastive term alone
        calm = exit_losses(trainer, feats, full, text, 1.0, 0.0)
        harsh = exit_losses(trainer, feats, rivals, text, 1.0, 0.0)
        own_calm = exit_losses(trainer, feats, full, text, 1.0, 0.0, mixed_gallery=False)
        own_harsh = exit_losses(trainer, feats, rivals, text, 1.0, 0.0, mixed_gallery=False)
    for e in (1, 2):  # each exit's loss rises when full-depth rows of other images outscore its own row
        assert harsh[1][e] > calm[1][e] + 0.05
    # the own-depth gallery (the loss before issue #20) never looked at full-depth images
    assert own_harsh[1] == own_calm[1]


def exit_losses_of_embeddings(trainer, emb, full, text) -> float:
    """Return the mixed-gallery contrastive loss (mean over exits) of given exit embeddings."""
    total, _ = exit_loss_shares(Dist(), trainer, emb, full, text, text, [full.shape[0]], 1.0, 0.0, all_full=full)
    return float(total)


def test_the_same_image_at_another_depth_is_no_negative(model_dir):
    trainer, _ = _trainer(model_dir)
    trainer.log_scales["1"].data.fill_(np.log(100.0))
    trainer.log_scales["2"].data.fill_(np.log(100.0))
    text = _unit(6, 32, seed=3)
    full = F.normalize(text + 0.3 * _unit(6, 32, seed=4), dim=-1)  # full depth matches its captions well
    # an exit that reproduces full depth exactly: its row and the full-depth row of the same image tie, and
    # they are the same image (an index holds one of them), so neither is the other's negative
    with torch.no_grad():
        exact = {e: full.clone() for e in (1, 2)}
        emb_loss = exit_losses_of_embeddings(trainer, exact, full, text)
    # were the same image's other rows negatives, the ties would cost at least (log 3 + log 2) / 4 = 0.45
    assert emb_loss < 0.2


def test_mixed_gallery_recall_puts_the_captions_images_at_the_exit_and_the_rest_at_full_depth():
    text = np.eye(3, dtype=np.float32)
    full = np.eye(3, dtype=np.float32)
    weak = np.full((3, 3), 0.5, np.float32)  # an exit whose rows score 0.5 for every caption
    groups = caption_groups(["a", "b", "c"])
    # caption i: its image at the exit scores 0.5, the other images at full depth score 0 -> still first
    assert mixed_gallery_recall(text, weak, full, groups)[1] == 1.0
    # its image at full depth scores 1, the others at the exit score 0.5 -> first too
    assert mixed_gallery_recall(text, full, weak, groups)[1] == 1.0
    rival = full.copy()
    rival[1] = [0.9, 0.1, 0.0]  # full-depth image 1 now outscores an exit row of image 0 for caption 0
    got = mixed_gallery_recall(text, weak, rival, groups)
    assert got[1] == pytest.approx(2 / 3)
    m = evaluate_embeddings({1: torch.from_numpy(weak), 2: torch.from_numpy(full)}, torch.from_numpy(full),
                            torch.from_numpy(text), torch.from_numpy(groups))
    assert m[2]["exit_vs_full_t2i"] == m[2]["full_vs_exit_t2i"] == m[2]["t2i"]  # full depth mixed with itself
    assert mixed_score(m, [1]) == (m[1]["exit_vs_full_t2i"][1] + m[1]["full_vs_exit_t2i"][1]) / 2


def _aug(x, column):
    """Rows of ``x`` with one more column holding ``column``: an offset the way `icar index` keeps it."""
    return np.hstack([x, np.full((len(x), 1), column, np.float32)]).astype(np.float32)


def test_calibrated_penalty_matches_recall_in_the_augmented_inner_product_gallery():
    rng = np.random.default_rng(0)

    def unit(x):
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    text = unit(rng.normal(size=(80, 16)))
    full = unit(text + rng.normal(size=(80, 16)) / 2)
    exit_rows = unit(text + rng.normal(size=(80, 16)) / 1.5)
    groups = caption_groups([str(i) for i in range(80)])  # distinct captions: every caption asks for its own image
    margins = mixed_margins(text, exit_rows, full, min_images=100)  # fewer pairs: one gallery of all 80
    assert [m[0] for m in margins] == [80]
    for scale, offset in ((1.0, 0.0), (0.8, 0.15), (1.1, -0.05)):
        [got] = calibrated_penalty(margins, scale, offset)
        q = _aug(text, 1.0)
        assert got["exit_vs_full_t2i@1"] == mixed_gallery_recall(q, _aug(scale * exit_rows, offset), _aug(full, 0.0),
                                                                 groups)[1]
        assert got["full_vs_exit_t2i@1"] == mixed_gallery_recall(q, _aug(full, 0.0), _aug(scale * exit_rows, offset),
                                                                 groups)[1]
        assert got["own_exit_t2i@1"] == recall_table(text, exit_rows, groups)["t2i"][1]
        assert got["penalty"] == max(got["own_exit_t2i@1"] - got["exit_vs_full_t2i@1"],
                                     got["own_full_t2i@1"] - got["full_vs_exit_t2i@1"])
    # galleries of every size down to min_images, each caption within its own image's part
    assert [m[0] for m in mixed_margins(text, exit_rows, full, min_images=20)] == [20, 40, 80]


def test_exit_calibration_finds_the_offset_a_scale_alone_cannot_replace():
    # An exit as good as full depth whose similarities sit on another line: exit = (full-like - 0.3) / 0.7 (a lower
    # level and a wider spread). Drawn per caption: own and best-rival similarity at each depth.
    rng = np.random.default_rng(1)
    margins = []
    for size, n in ((250, 4000), (1000, 4000), (4000, 4000)):
        def draw():
            own = rng.normal(0.90, 0.03, n)
            rival = rng.normal(0.86 + 0.01 * np.log2(size / 250), 0.03, n)
            return own, rival

        own_f, rival_f = draw()
        own_x, rival_x = draw()  # an independent draw of the same quality, on the exit's line
        margins.append((size, (own_x - 0.3) / 0.7, (rival_x - 0.3) / 0.7, own_f, rival_f))
    got = choose_exit_calibration(margins)
    assert got["scale"] == pytest.approx(0.7, abs=0.06)
    assert got["offset"] == pytest.approx(0.3, abs=0.06)
    assert got["penalty"] < 0.01
    assert got["penalty"] == max(r["penalty"] for r in got["by_gallery"])
    assert [r["images"] for r in got["by_gallery"]] == [250, 1000, 4000]
    assert calibrated_penalty(margins, got["scale"], got["offset"]) == got["by_gallery"]
    # the best a scale alone can do loses over a point at some gallery size
    scale_only = min(max(r["penalty"] for r in calibrated_penalty(margins, s, 0.0)) for s in np.arange(0.8, 1.3, 0.001))
    assert scale_only > 0.02
    assert not got["at_grid_edge"]
    # an exit whose line lies beyond the grid (slope 0.25 < 0.5): the best pair on the grid says it sits at the edge
    far = [(size, (own_e * 0.7 + 0.3 - 0.75) / 0.25, (rival_e * 0.7 + 0.3 - 0.75) / 0.25, own_f, rival_f)
           for size, own_e, rival_e, own_f, rival_f in margins]
    assert choose_exit_calibration(far)["at_grid_edge"]
    # an exit that is full depth needs no calibration
    same = [(size, own_f, rival_f, own_f, rival_f) for size, _, _, own_f, rival_f in margins]
    assert choose_exit_calibration(same)["scale"] == 1.0 and choose_exit_calibration(same)["offset"] == 0.0


def _pairs(n: int, seed: int):
    colors = [(220, 40, 40), (40, 165, 60), (40, 80, 220), (240, 210, 40), (200, 60, 200), (40, 200, 200)]
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        c = i % len(colors)
        px = np.clip(np.array(colors[c]) + rng.normal(0, 25, (32, 32, 3)), 0, 255).astype(np.uint8)
        items.append((f"k{i}", px, f"picture number {c}"))
    return lambda: iter(items)


def _cfg(tmp_path, model_dir, **kw) -> et.ExitTrainConfig:
    base = dict(inputs=[], output=str(tmp_path / "out"), model=model_dir, exits=[1, 2, 4], epochs=4, batch_size=16,
                lr=1e-3, device="cpu", extract_batch_size=32)
    base.update(kw)
    return et.ExitTrainConfig(**base)


def test_train_exits_reports_mixed_recall_per_exit_and_keeps_the_best_mixed_epoch(model_dir, tmp_path):
    # a rate so high that training overshoots: later epochs are worse, so keeping the best one is a real choice
    et.ExitTrainer(_cfg(tmp_path, model_dir, lr=0.3), _pairs(64, 0), _pairs(30, 1)).run()
    doc = json.loads((tmp_path / "out" / "metrics.json").read_text())
    scores = [h["val_mixed_t2i@1"] for h in doc["history"]]
    for h in doc["history"]:
        for e in ("1", "2"):
            assert {"mixed_t2i@1", "exit_vs_full_t2i@1", "full_vs_exit_t2i@1"} <= set(h["val"][e])
        assert h["val_mixed_t2i@1"] == pytest.approx(
            np.mean([(h["val"][e]["exit_vs_full_t2i@1"] + h["val"][e]["full_vs_exit_t2i@1"]) / 2 for e in "12"]))
    best = int(np.argmax(scores))
    assert doc["selected_epoch"] == best != len(scores) - 1
    assert "mixed-gallery" in doc["selected_by"]
    # the heads written are the selected epoch's: their metrics are that epoch's validation metrics
    for e in ("1", "2"):
        assert doc["after"][e]["exit_vs_full_t2i"]["1"] == doc["history"][best]["val"][e]["exit_vs_full_t2i@1"]
        assert doc["after"][e]["t2i"]["1"] == doc["history"][best]["val"][e]["t2i@1"]
    bundle = models.load_clip(model_dir)
    heads = enc.ExitHeads.load(str(tmp_path / "out" / "exit_heads.safetensors"), bundle)
    assert heads.identity["sha256"] == doc["heads"]["sha256"]
    # the per-exit score calibration chosen on the training pairs is recorded in the heads file and the metrics,
    # with what it gives the held-out validation pairs
    meta = safetensors_metadata((tmp_path / "out" / "exit_heads.safetensors").read_bytes())
    for key, field in ((et.EXIT_SCALES, "scale"), (et.EXIT_OFFSETS, "offset")):
        assert json.loads(meta[key]) == {e: doc["exit_calibration"][e][field] for e in ("1", "2")}
    assert heads.saved_offsets == {int(e): doc["exit_calibration"][e]["offset"] for e in ("1", "2")}
    for e in ("1", "2"):
        c = doc["exit_calibration"][e]
        assert c["pairs"] == 64 and c["val"][-1]["captions"] == 30
        assert c["penalty"] == max(r["penalty"] for r in c["by_gallery"])

    last = et.ExitTrainer(_cfg(tmp_path / "last", model_dir, lr=0.3, select_epoch="last"), _pairs(64, 0),
                          _pairs(30, 1)).run()
    assert last["selected_epoch"] == 3
    assert [h["val"] for h in last["history"]] == [h["val"] for h in doc["history"]]  # the same training
    assert last["heads"]["sha256"] != doc["heads"]["sha256"]
    with pytest.raises(et.TrainExitsError, match="select_epoch"):
        et.ExitTrainer(_cfg(tmp_path / "bad", model_dir, select_epoch="best"))
