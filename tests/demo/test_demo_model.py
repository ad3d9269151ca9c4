"""The demo CLIP trainer: tokenizer, training end to end on a tiny corpus, saved files that load back."""

from __future__ import annotations

import json

import numpy as np
import open_clip
import pytest
import torch
from safetensors.torch import load_file

from jobs import train_demo as job
from pipeline.demo import corpus as dc
from pipeline.demo import training as dt

TINY = {"vision_width": 32, "vision_layers": 2, "vision_head_width": 16, "patch_size": 16, "text_width": 32,
        "text_layers": 1, "text_heads": 2, "embed_dim": 16}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared 2-core box: one thread is several times faster than two fighting for cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo") / "corpus"
    dc.make_demo_corpus(dc.DemoCorpusConfig(output=str(root), n=84, val=20, test=0, shard_size=40, image_size=64,
                                            complexity_train=0, progress=False))
    return root


def _train(corpus, out, **kw):
    args = dict(corpus=str(corpus), output=str(out), model=dt.DemoModelConfig(**TINY), epochs=2, batch_size=32,
                warmup_steps=1, eval_images=20, threads=1, progress=False)
    args.update(kw)
    return dt.train_demo(dt.DemoTrainConfig(**args))


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("model")
    return out, _train(corpus, out)


def test_cut_down_bpe_tokenizes_the_captions_exactly_like_open_clip(tmp_path):
    captions = [dc.make_sample(0, "train", i, 48, 90).caption for i in range(200)]
    path = tmp_path / "bpe.txt.gz"
    path.write_bytes(dt.build_demo_bpe(captions[:150]))
    small, full = dt.demo_tokenizer(path, 40), open_clip.tokenizer.SimpleTokenizer(context_length=40)
    assert small.vocab_size < 1500
    # Same pieces for every caption, including ones the BPE was not built from (same vocabulary of words).
    for c in captions:
        assert [small.decoder[i] for i in small.encode(c)] == [full.decoder[i] for i in full.encode(c)]
    # The end token has the highest id: open_clip's text pooling (argmax) finds it that way.
    assert small.eot_token_id == small.vocab_size - 1
    # Text the captions never use still tokenizes, into ids the embedding table holds.
    ids = small(["a zebra crossing with 3 dogs, très jolie!"])
    assert ids.max().item() < small.vocab_size and ids[0, 0].item() == small.sot_token_id


def test_depth_features_at_full_depth_equal_encode_image():
    model = dt.build_model(dt.DemoModelConfig(**TINY).open_clip_cfg(600), seed=0).eval()
    x = torch.randn(3, 3, 64, 64)
    feats = dt.image_features_by_depth(model, x, [1, 2])
    with torch.no_grad():
        ref = model.encode_image(x, normalize=True)
    assert torch.allclose(feats[2], ref, atol=1e-6)
    assert not torch.allclose(feats[1], ref, atol=1e-3)


def test_recall_counts_the_rank_of_the_true_match():
    sim = torch.eye(4)
    assert dt.recall_at_k(sim)["t2i_r1"] == 1.0
    sim = torch.tensor([[0.1, 0.9, 0.0], [0.0, 1.0, 0.5], [0.2, 0.1, 0.0]])
    r = dt.recall_at_k(sim, ks=(1, 2, 3))
    # Recalls are rounded to 4 places for the card.
    # Text ranks of the true image: 1, 0, 2; image ranks of the true text: 1, 0, 1 (ties do not count).
    assert (r["t2i_r1"], r["t2i_r2"], r["t2i_r3"]) == (0.3333, 0.6667, 1.0)
    assert (r["i2t_r1"], r["i2t_r2"], r["i2t_r3"]) == (0.3333, 1.0, 1.0)


def test_a_few_steps_of_clip_loss_lower_it_on_a_fixed_batch():
    torch.manual_seed(0)
    model = dt.build_model(dt.DemoModelConfig(**TINY).open_clip_cfg(300), seed=0)
    x, t = torch.randn(16, 3, 64, 64), torch.randint(1, 298, (16, 40))
    loss_fn, opt = open_clip.loss.ClipLoss(), torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = loss_fn(*model(x, t))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3


def test_training_writes_a_model_that_loads_back_with_open_clip(trained, corpus):
    out, card = trained
    doc = json.loads((out / dt.CONFIG_FILE).read_text())
    assert doc["model_name"] == "icar-demo" and set(doc["model_cfg"]) == {"embed_dim", "vision_cfg", "text_cfg"}
    # The contract: open_clip.model.CLIP(**model_cfg) + the full state_dict from clip.safetensors.
    model = open_clip.model.CLIP(**doc["model_cfg"])
    model.load_state_dict(load_file(str(out / dt.WEIGHTS_FILE)), strict=True)
    model.eval()
    tok = dt.demo_tokenizer(out / doc["tokenizer"]["bpe_path"], doc["tokenizer"]["context_length"])
    assert doc["model_cfg"]["text_cfg"]["vocab_size"] == tok.vocab_size

    # Re-evaluating the saved model gives the card's metrics: what was measured is what was shipped.
    val = dt.load_split(str(corpus), "val", 64, limit=20, progress=False)
    again = dt.evaluate(model, tok, val, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)
    assert again["full"] == card["metrics"]["val"]["full"]
    assert set(card["metrics"]["val"]["by_depth"]) == {"1", "2"}
    assert set(card["metrics"]["val"]["attribute_probe"]) == set(dt.PROBE_ATTRIBUTES)
    assert card["train"]["steps"] == 4 and card["train"]["train_images"] == 64
    assert set(card["train"]["history"][0]["val_full_depth"]) == {f"{d}_r{k}" for d in ("t2i", "i2t") for k in (1, 5, 10)}
    assert card["gflops_per_image"]["image_tower"] > 0 and card["gflops_per_image"]["text_tower"] > 0
    assert card["reproduce"].startswith("icar make-demo-corpus") and "icar train-demo" in card["reproduce"]
    assert card["files"][dt.WEIGHTS_FILE]["bytes"] == (out / dt.WEIGHTS_FILE).stat().st_size
    for key in ("torch", "open_clip", "python"):
        assert card["versions"][key]


def test_same_seed_reproduces_the_weights(trained, corpus, tmp_path):
    out, _ = trained
    _train(corpus, tmp_path / "again")
    a, b = load_file(str(out / dt.WEIGHTS_FILE)), load_file(str(tmp_path / "again" / dt.WEIGHTS_FILE))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_refuses_unknown_model_fields_and_a_batch_larger_than_the_corpus(corpus, tmp_path):
    with pytest.raises(SystemExit, match="unknown fields"):
        job.main(["--corpus", str(corpus), "--output", str(tmp_path), "--model-json", '{"depth": 3}'])
    with pytest.raises(ValueError, match="fewer than --batch-size"):
        job.main(["--corpus", str(corpus), "--output", str(tmp_path), "--batch-size", "512", "--no-progress",
                  "--model-json", json.dumps(TINY)])


def test_shift_augmentation_moves_pixels_but_keeps_shape():
    gen = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    y = dt.random_shift(x, 2, gen)
    assert y.shape == x.shape
    assert not torch.equal(x, y) and np.isin(y.numpy(), x.numpy()).all()


def test_the_project_loader_reads_the_written_directory(trained):
    from pipeline.model.models import load_clip

    out, card = trained
    bundle = load_clip(str(out))
    model, tok, _ = dt.load_trained(out)
    assert bundle.image_size == 64 and bundle.num_blocks == 2 and bundle.embed_dim == 16
    assert bundle.tokenizer.vocab_size == tok.vocab_size == card["vocab_size"]
    captions = ["two red circles on a plain blue background", "a small green star in the top left"]
    assert torch.equal(bundle.tokenizer(captions), tok(captions))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(bundle.model.encode_image(x), model.encode_image(x))


def _pool(backgrounds, n_options=3):
    options = [[3 * i + j for j in range(n_options)] for i in range(len(backgrounds))]
    return dt.CaptionPool(tokens=torch.arange(3 * len(backgrounds)).view(-1, 1), options=options,
                          background=list(backgrounds))


def test_same_background_batches_hold_one_colour_and_the_rest_are_mixed():
    colours = ["red", "blue", "green", "gray"] * 64  # 256 images
    pool = _pool(colours)
    batches = dt.epoch_batches(pool, 32, 0.5, torch.Generator().manual_seed(0))
    assert len(batches) == 8 and all(len(b) == 32 for b in batches)
    assert len(set(torch.cat(batches).tolist())) == 256  # every image once
    kinds = [len({colours[i] for i in b.tolist()}) for b in batches]
    assert sum(k <= 2 for k in kinds) >= 4 and sum(k == 4 for k in kinds) >= 3
    again = dt.epoch_batches(pool, 32, 0.5, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(batches, again))


def test_captions_are_full_or_a_shorter_true_one_at_the_asked_rate():
    pool = _pool(["red"] * 2000)
    idx = torch.arange(2000)
    picked = dt.pick_captions(pool, idx, 0.5, torch.Generator().manual_seed(0)).view(-1)
    offset = picked - 3 * idx  # 0: the full caption, 1-2: a partial one of the same image
    assert offset.min() >= 0 and offset.max() <= 2
    assert 0.45 < (offset == 0).float().mean() < 0.55
    assert (dt.pick_captions(pool, idx, 1.0, torch.Generator()).view(-1) == 3 * idx).all()


def test_attribute_probe_scores_every_attribute(trained, corpus):
    out, _ = trained
    model, tok, _ = dt.load_trained(out)
    val = dt.load_split(str(corpus), "val", 64, limit=20, progress=False)
    probe = dt.attribute_probe(model, tok, val, 0, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)
    assert set(probe) == set(dt.PROBE_ATTRIBUTES)
    assert all(v is None or 0.0 <= v <= 1.0 for v in probe.values())
    val.captions[0] = "something else"
    with pytest.raises(ValueError, match="regenerated caption differs"):
        dt.attribute_probe(model, tok, val, 0, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)
