"""The demo corpus generator: determinism, img2dataset layout, true captions, complexity labels."""

from __future__ import annotations

import io
import json
import re
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs import make_demo_corpus as job
from pipeline.demo import corpus as dc


def _make(tmp_path, name="c", **kw):
    args = dict(n=60, val=10, test=10, shard_size=25, image_size=64, complexity_train=15, progress=False)
    args.update(kw)
    cfg = dc.DemoCorpusConfig(output=str(tmp_path / name), **args)
    return cfg, dc.make_demo_corpus(cfg)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo")
    cfg, doc = _make(tmp)
    return tmp / "c", cfg, doc


def _tar_members(path):
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def test_same_seed_gives_identical_shards_and_another_seed_does_not(corpus, tmp_path):
    root, _, doc = corpus
    _, doc_again = _make(tmp_path, "again")
    _, doc_other = _make(tmp_path, "other", seed=1)
    for split in dc.SPLITS:
        for shard in doc["splits"][split]["shards"]:
            assert (root / shard).read_bytes() == (tmp_path / "again" / shard).read_bytes(), shard
            assert (root / shard).read_bytes() != (tmp_path / "other" / shard).read_bytes(), shard
    assert (root / "complexity/train.txt").read_bytes() == (tmp_path / "again/complexity/train.txt").read_bytes()


def test_held_out_scenes_do_not_depend_on_the_train_size(tmp_path):
    small = dc.make_sample(0, "test", 3, 64, 90)
    cfg, doc = _make(tmp_path, "bigger", n=90)
    members = dict(_tar_members(tmp_path / "bigger" / doc["splits"]["test"]["shards"][0]))
    key = dc.sample_key(int(doc["splits"]["test"]["shards"][0][-9:-4]), 3, cfg.shard_size)
    assert members[f"{key}.jpg"] == small.jpeg
    assert members[f"{key}.txt"].decode() == small.caption


def test_layout_is_what_img2dataset_writes(corpus):
    root, cfg, doc = corpus
    assert [doc["splits"][s]["count"] for s in dc.SPLITS] == [40, 10, 10]
    assert doc["splits"]["train"]["shards"] == ["train/00000.tar", "train/00001.tar"]
    assert doc["splits"]["val"]["shards"] == ["val/00002.tar"]
    assert doc["splits"]["test"]["shards"] == ["test/00003.tar"]
    keys_seen = set()
    for split in dc.SPLITS:
        for shard in doc["splits"][split]["shards"]:
            members = _tar_members(root / shard)
            names = [n for n, _ in members]
            keys = [n[:-4] for n in names[::3]]
            # One sample is KEY.jpg, KEY.json, KEY.txt in that order (webdataset TarWriter's sorted order).
            assert names == [f"{k}.{ext}" for k in keys for ext in ("jpg", "json", "txt")]
            shard_id = int(shard.split("/")[1][:5])
            # img2dataset's key: 5-digit shard id then the index, padded to ceil(log10(shard size)) digits.
            assert keys == [f"{shard_id:05d}{i:02d}" for i in range(len(keys))]
            blobs = dict(members)
            for k in keys:
                meta = json.loads(blobs[f"{k}.json"])
                assert meta["key"] == k and meta["status"] == "success" and meta["split"] == split
                assert meta["caption"] == blobs[f"{k}.txt"].decode()
                assert meta["url"].startswith("https://demo.icar.invalid/")
                img = Image.open(io.BytesIO(blobs[f"{k}.jpg"]))
                assert img.format == "JPEG" and img.size == (meta["width"], meta["height"]) == (64, 64)
                assert 0.0 <= meta["complexity"] <= 1.0
            stats = json.loads((root / shard.replace(".tar", "_stats.json")).read_text())
            assert stats["count"] == stats["successes"] == len(keys) and stats["status_dict"] == {"success": len(keys)}
            table = pq.read_table(root / shard.replace(".tar", ".parquet"))
            assert table.column("key").to_pylist() == keys
            keys_seen.update(keys)
    assert len(keys_seen) == cfg.n  # keys are unique across the whole corpus


def test_complexity_labels_are_ic9600_layout_and_match_the_scenes(corpus):
    root, cfg, doc = corpus
    scenes = pq.read_table(root / "scenes.parquet").to_pylist()
    by_key = {r["key"]: r for r in scenes}
    assert len(scenes) == cfg.n
    assert all(r["partial_captions"] and r["background_color"] in dc.COLORS for r in scenes)
    for split, expected_split, count in (("train", "train", 15), ("test", "test", 10)):
        lines = (root / "complexity" / f"{split}.txt").read_text().splitlines()
        assert len(lines) == count == doc["complexity"][f"{split}_count"]
        for line in lines:
            m = re.fullmatch(r"(\d+)\.jpg  ([01]\.\d{4})", line)
            assert m, line
            key, score = m.group(1), float(m.group(2))
            assert by_key[key]["split"] == expected_split
            assert score == pytest.approx(by_key[key]["complexity"], abs=1e-4)
            Image.open(root / "complexity" / "images" / f"{key}.jpg").verify()


def test_complexity_formula_orders_scenes_and_covers_the_range():
    flat = dc.Scene(groups=[dc.ObjectGroup("circle", "red", 1, "medium", None)], background="plain",
                    background_color="blue", pattern_energy=0.0)
    assert dc.scene_complexity(flat) == 0.0
    more_objects = dc.Scene(groups=[dc.ObjectGroup("circle", "red", 4, "small", None),
                                    dc.ObjectGroup("star", "green", 3, "small", None)],
                            background="plain", background_color="blue", pattern_energy=0.0)
    cluttered = dc.Scene(groups=more_objects.groups, background="noise", background_color="blue",
                         pattern_energy=0.9, n_specks=30, n_lines=8, grain=12.0)
    assert 0 < dc.scene_complexity(more_objects) < dc.scene_complexity(cluttered) <= 1.0

    values = np.array([dc.make_sample(7, "train", i, 64, 90).complexity for i in range(300)])
    assert values.min() == 0.0 and values.max() > 0.75
    assert 0.15 < np.mean(values < 0.1) < 0.5  # a real share of easy images, but not a majority
    assert np.histogram(values, bins=5, range=(0, 1))[0][:4].min() > 10  # no gap in the bulk of the range


def test_captions_name_every_group_with_its_count_colour_and_shape():
    for i in range(50):
        rng = np.random.default_rng([3, 0, i])
        scene = dc.sample_scene(rng)
        caption = dc.scene_caption(scene)
        for g in scene.groups:
            assert g.color in caption
            noun = g.shape if g.count == 1 else ("crosses" if g.shape == "cross" else g.shape + "s")
            count = {1: "a", 2: "two", 3: "three", 4: "four"}[g.count]
            assert re.search(rf"\b{count}n? (small |large )?{g.color} {noun}\b", caption), caption
            if g.region:
                assert g.region in caption
        assert f"{scene.background_color} " in caption or caption.endswith(scene.background_color)


def test_partial_captions_are_shorter_true_statements():
    scene = dc.Scene(groups=[dc.ObjectGroup("circle", "red", 2, "medium", None),
                             dc.ObjectGroup("star", "blue", 1, "small", "in the top left")],
                     background="stripes", background_color="green", pattern_energy=0.5)
    assert dc.scene_caption(scene) == "two red circles and a small blue star in the top left on a striped green background"
    assert dc.scene_partial_captions(scene) == [
        "two red circles and a small blue star in the top left", "two red circles",
        "two red circles on a striped green background", "a small blue star in the top left",
        "a small blue star in the top left on a striped green background"]


def test_rendered_image_shows_the_caption_in_its_place():
    scene = dc.Scene(groups=[dc.ObjectGroup("square", "red", 1, "medium", "in the top left")],
                     background="plain", background_color="blue", pattern_energy=0.0)
    for seed in range(5):
        pixels = np.asarray(dc.render_scene(scene, np.random.default_rng(seed), 128)).astype(int)
        red = (pixels[..., 0] > 180) & (pixels[..., 2] < 80)
        ys, xs = np.nonzero(red)
        assert red.sum() > 200  # a medium square is ~ (2*0.105*0.85*128)^2 ~ 520 px
        assert xs.max() < 64 and ys.max() < 64  # all of it in the top-left quadrant
        assert (pixels[100, 100] == dc.COLORS["blue"]).all()


def test_held_out_splits_default_to_five_percent_each(tmp_path):
    assert dc.DemoCorpusConfig(output="x", n=2000).split_sizes() == {"train": 1800, "val": 100, "test": 100}


def test_bad_split_sizes_are_refused_with_the_fix(tmp_path):
    with pytest.raises(ValueError, match="no training images"):
        dc.DemoCorpusConfig(output=str(tmp_path), n=100, val=60, test=40).split_sizes()


def test_cli_writes_a_corpus_and_prints_a_summary(tmp_path, capsys):
    out = tmp_path / "cli"
    rc = job.main(["--n", "12", "--val", "2", "--test", "2", "--shard-size", "5", "--image-size", "48",
                   "--output", str(out), "--no-progress"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["images"] == {"train": 8, "val": 2, "test": 2}
    doc = json.loads((out / "corpus.json").read_text())
    assert doc["splits"]["train"]["shards"] == ["train/00000.tar", "train/00001.tar"]
    assert "--n 12" in doc["command"]
