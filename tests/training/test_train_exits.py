"""icar train-exits: heads train on cached frozen features, report before/after, resume, and the fine-tune recipe."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from jobs import train_exits as job
from pipeline.demo import corpus as dc
from pipeline.model import encoder as enc
from pipeline.training import exits as et
from pipeline.training import features
from pipeline.training.pairs import PairStats, iter_pairs
from pipeline.training.recall import caption_groups, evaluate_embeddings, recall_table
from pipeline.model import models
from preempt import preempt_after_first_epoch

TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 4, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
COLORS = {"red": (220, 40, 40), "green": (40, 165, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40)}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random CLIP stored as a model directory (clip_config.json + clip.safetensors), like the demo."""
    d = tmp_path_factory.mktemp("tiny-model")
    b = models.bundle_from_config(TINY, seed=0)
    (d / "clip_config.json").write_text(json.dumps({"model_name": "tiny", "model_cfg": TINY}))
    save_file({k: v.contiguous() for k, v in b.model.state_dict().items()}, str(d / "clip.safetensors"))
    return str(d)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The demo corpus generator's WebDataset shards, small: 120 train and 40 val captioned images."""
    root = tmp_path_factory.mktemp("corpus")
    dc.make_demo_corpus(dc.DemoCorpusConfig(output=str(root), n=160, val=40, test=0, shard_size=60, image_size=32,
                                            complexity_train=0, progress=False))
    return root


def synthetic_pairs(n: int, seed: int = 0):
    """Return a callable giving (key, pixels, caption): flat colour images captioned by their colour."""
    rng = np.random.default_rng(seed)
    names = list(COLORS)
    items = []
    for i in range(n):
        name = names[i % len(names)]
        px = np.clip(np.array(COLORS[name]) + rng.normal(0, 25, (32, 32, 3)), 0, 255).astype(np.uint8)
        items.append((f"k{i}", px, f"a {name} picture"))
    return lambda: iter(items)


def _cfg(tmp_path, model_dir, **kw) -> et.ExitTrainConfig:
    base = dict(inputs=[], output=str(tmp_path / "out"), model=model_dir, exits=[1, 2, 4], epochs=3, batch_size=16,
                lr=1e-3, device="cpu", extract_batch_size=32)
    base.update(kw)
    return et.ExitTrainConfig(**base)


def test_cli_trains_on_shards_and_reports_before_and_after(corpus, model_dir, tmp_path, capsys):
    out = tmp_path / "heads"
    rc = job.main([str(corpus / "train" / "*.tar"), "--val", str(corpus / "val" / "*.tar"), "--output", str(out),
                   "--model", model_dir, "--exits", "1,2,4", "--epochs", "3", "--batch-size", "16", "--lr", "3e-3",
                   "--device", "cpu"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "before → after" in printed and "t2i R@1" in printed
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["pairs"] == {"train": 120, "val": 40}
    assert set(doc["before"]) == set(doc["after"]) == {"1", "2", "4"}
    for split in ("before", "after"):
        for row in doc[split].values():
            assert set(row) == {"t2i", "i2t", "cos_to_full", "mixed_t2i", "exit_vs_full_t2i", "full_vs_exit_t2i"}
            assert set(row["t2i"]) == set(row["i2t"]) == set(row["mixed_t2i"]) == {"1", "5", "10"}
        for mixed in ("mixed_t2i", "exit_vs_full_t2i", "full_vs_exit_t2i"):
            assert doc[split]["4"][mixed] == doc[split]["4"]["t2i"]  # full depth mixed with itself
    assert doc["before"]["4"] == doc["after"]["4"]  # frozen backbone: full depth untouched
    assert doc["after"]["4"]["cos_to_full"] == pytest.approx(1.0, abs=1e-5)
    losses = [h["train_loss"] for h in doc["history"]]
    assert len(losses) == 3 and all(losses[-1][e] < losses[0][e] for e in ("1", "2"))

    # the saved heads are the trained ones: loaded onto the model, they reproduce the reported metrics
    bundle = models.load_clip(model_dir)
    heads = enc.ExitHeads.load(str(out / "exit_heads.safetensors"), bundle)
    assert heads.identity == doc["heads"] | {"path": str(out / "exit_heads.safetensors")}
    encoder = enc.AdaptiveEncoder(bundle.model.visual, [1, 2, 4], heads).eval()
    pairs = list(iter_pairs([str(corpus / "val" / "*.tar")], 32))
    x = models.pixels_to_tensor(bundle, np.stack([p for _, p, _ in pairs]))
    with torch.no_grad():
        per_exit = encoder.forward_all_exits(x)
    text = torch.from_numpy(models.encode_text(bundle, [c for _, _, c in pairs]))
    groups = torch.from_numpy(caption_groups([c for _, _, c in pairs]))
    again = evaluate_embeddings(per_exit, per_exit[4], text, groups)
    for e in (1, 2):
        assert again[e]["t2i"] == {int(k): v for k, v in doc["after"][str(e)]["t2i"].items()}
        assert again[e]["cos_to_full"] == pytest.approx(doc["after"][str(e)]["cos_to_full"], abs=1e-5)
        # the mixed gallery: every other image at exit e, the rest at full depth, recomputed by hand
        mixed = per_exit[4].clone()
        mixed[::2] = per_exit[e][::2]
        by_hand = recall_table(text.numpy(), mixed.numpy(), groups.numpy())["t2i"]
        assert {int(k): v for k, v in doc["after"][str(e)]["mixed_t2i"].items()} == by_hand


def test_resume_after_a_crash_gives_the_same_heads(model_dir, tmp_path, monkeypatch):
    pairs = synthetic_pairs(64)
    straight = et.ExitTrainer(_cfg(tmp_path / "a", model_dir), pairs, synthetic_pairs(24, seed=1)).run()

    saves = []
    preempt_after_first_epoch(monkeypatch, saves)
    cfg = _cfg(tmp_path / "b", model_dir)
    with pytest.raises(KeyboardInterrupt):
        et.ExitTrainer(cfg, pairs, synthetic_pairs(24, seed=1)).run()
    with pytest.raises(et.TrainExitsError, match="--resume"):
        et.ExitTrainer(cfg, pairs, synthetic_pairs(24, seed=1)).run()
    resumed = et.ExitTrainer(_cfg(tmp_path / "b", model_dir, resume=True), pairs, synthetic_pairs(24, seed=1)).run()
    assert saves == [0, 1, 2]  # epoch 0 was not run twice
    assert len(resumed["history"]) == 3
    assert resumed["heads"]["sha256"] == straight["heads"]["sha256"]
    assert resumed["after"] == straight["after"]
    # the best epoch so far travels in the checkpoint: the resumed run keeps the same one
    assert resumed["selected_epoch"] == straight["selected_epoch"]
    assert resumed["exit_calibration"] == straight["exit_calibration"]


def test_resume_refuses_a_checkpoint_of_another_merge_schedule(model_dir, tmp_path, monkeypatch):
    pairs, val = synthetic_pairs(48), synthetic_pairs(16, seed=1)
    original = preempt_after_first_epoch(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        et.ExitTrainer(_cfg(tmp_path, model_dir, epochs=2, merge="keep0.8"), pairs, val).run()
    monkeypatch.setattr(et.ExitTrainer, "_save_checkpoint", original)
    for other in (None, "keep0.9", "r2"):  # unmerged, or another schedule: its heads would serve the wrong tokens
        with pytest.raises(et.TrainExitsError, match=r"trained under merge schedule keep0\.8.*--merge keep0\.8"):
            et.ExitTrainer(_cfg(tmp_path, model_dir, epochs=2, merge=other, resume=True), pairs, val).run()
    done = et.ExitTrainer(_cfg(tmp_path, model_dir, epochs=2, merge="keep0.8", resume=True), pairs, val).run()
    assert len(done["history"]) == 2 and done["heads"]["merge"] == "keep0.8"


def test_feature_cache_is_reused_on_resume(corpus, model_dir, tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, model_dir, inputs=[str(corpus / "train" / "*.tar")], val_fraction=0.25, epochs=1)
    first = et.train_exits(cfg)
    assert first["pairs"]["train"] + first["pairs"]["val"] == 120  # the val split is held out of the inputs
    assert (tmp_path / "out" / "features-train.safetensors").exists()

    def no_extraction(*args, **kwargs):
        raise AssertionError("features should come from the cache")

    monkeypatch.setattr(features, "extract_features", no_extraction)
    again = et.train_exits(_cfg(tmp_path, model_dir, inputs=[str(corpus / "train" / "*.tar")], val_fraction=0.25,
                                epochs=2, resume=True))
    assert [h["epoch"] for h in again["history"]] == [0, 1]
    assert again["pairs"] == first["pairs"]
    assert again["samples"] == first["samples"] and first["samples"]["train"]["used"] == first["pairs"]["train"]


def test_finetune_backbone_makes_a_new_model(model_dir, tmp_path):
    cfg = _cfg(tmp_path, model_dir, finetune_backbone=True, epochs=1, batch_size=8, backbone_lr=1e-3)
    doc = et.ExitTrainer(cfg, synthetic_pairs(24), synthetic_pairs(12, seed=1)).run()
    original = models.load_clip(model_dir)
    tuned = models.load_clip(str(tmp_path / "out" / "backbone"))
    assert tuned.identity["weights_sha256"] != original.identity["weights_sha256"]
    assert doc["model"]["weights_sha256"] == tuned.identity["weights_sha256"]
    heads_path = str(tmp_path / "out" / "exit_heads.safetensors")
    enc.ExitHeads.load(heads_path, tuned)  # the heads belong to the fine-tuned backbone...
    with pytest.raises(enc.HeadsMismatchError):
        enc.ExitHeads.load(heads_path, original)  # ...not to the model it started from
    assert doc["before"]["4"] != doc["after"]["4"]  # full depth moved: old indexes would not match
    # the text tower stayed frozen
    texts = ["a red picture", "a blue picture"]
    np.testing.assert_allclose(models.encode_text(tuned, texts), models.encode_text(original, texts), atol=1e-6)


def test_iter_pairs_counts_what_it_skips(tmp_path):
    from PIL import Image

    good = io.BytesIO()
    Image.fromarray(np.full((40, 40, 3), 128, np.uint8)).save(good, format="JPEG")
    members = [("a.jpg", good.getvalue()), ("a.txt", b"a grey square"),
               ("b.jpg", b"not a jpeg at all"), ("b.txt", b"broken"),
               ("c.jpg", good.getvalue())]  # no caption
    path = tmp_path / "00000.tar"
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    stats = PairStats()
    pairs = list(iter_pairs([str(path)], 32, stats=stats))
    assert [(k, c) for k, _, c in pairs] == [("a", "a grey square")]
    assert pairs[0][1].shape == (32, 32, 3) and pairs[0][1].dtype == np.uint8
    assert (stats.read, stats.used, stats.decode_errors, stats.no_caption) == (3, 1, 1, 1)


def test_bad_configurations_are_refused(model_dir, tmp_path):
    with pytest.raises(et.TrainExitsError, match="no early exit"):
        et.ExitTrainer(_cfg(tmp_path, model_dir, exits=[4]))
    with pytest.raises(et.TrainExitsError, match="batch_size >= 2"):
        et.ExitTrainer(_cfg(tmp_path, model_dir, batch_size=1))
    assert job.main([str(tmp_path / "nothing-*.tar"), "--output", str(tmp_path / "o"), "--model", model_dir]) == 2


def test_an_earlier_runs_checkpoint_is_refused_before_features_are_extracted(corpus, model_dir, tmp_path, monkeypatch):
    inputs = [str(corpus / "train" / "*.tar")]
    et.train_exits(_cfg(tmp_path, model_dir, inputs=inputs, val_fraction=0.25, epochs=1))
    for cache in (tmp_path / "out").glob("features-*.safetensors"):
        cache.unlink()  # as when the options change: the caches would be extracted again

    def no_extraction(*args, **kwargs):
        raise AssertionError("a run that will be refused must not extract features first")

    monkeypatch.setattr(features, "extract_features", no_extraction)
    with pytest.raises(et.TrainExitsError, match=r"checkpoint\.pt exists from an earlier run: pass --resume"):
        et.train_exits(_cfg(tmp_path, model_dir, inputs=inputs, val_fraction=0.25, epochs=2))
