"""Searching an index directory: text, image and vector queries with the index's own model; refusals; CLI."""

from __future__ import annotations

import copy
import io
import json
import os

import numpy as np
import pytest

faiss = pytest.importorskip("faiss")
torch = pytest.importorskip("torch")

from PIL import Image  # noqa: E402

from jobs import search as search_job  # noqa: E402
from pipeline.io.schema import model_key  # noqa: E402
from pipeline.model import models  # noqa: E402
from pipeline.io.decode import DecodeConfig, decode_image  # noqa: E402
from pipeline.index.build import IndexConfig, build_index  # noqa: E402
from pipeline.index.layout import INDEX_JSON  # noqa: E402
from pipeline.index.search import IndexModelMismatchError, Searcher  # noqa: E402
from tests.index.test_index import clustered, make_run  # noqa: E402

TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
N_IMAGES = 40


@pytest.fixture(autouse=True, scope="module")
def one_faiss_thread():
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def png(seed: int) -> bytes:
    """Return a small seeded picture (coloured blocks) as PNG bytes."""
    rng = np.random.default_rng(seed)
    img = np.kron(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8), np.ones((12, 12, 1), np.uint8))
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def tiny():
    return models.bundle_from_config(copy.deepcopy(TINY), seed=0, name="tiny")


@pytest.fixture(scope="module")
def corpus(tiny):
    """Embeddings of N_IMAGES pictures by the tiny model's full-depth image tower (what `icar embed` stores)."""
    pixels = np.stack([decode_image(png(i), DecodeConfig(image_size=tiny.image_size)).pixels for i in range(N_IMAGES)])
    with torch.no_grad():
        emb = tiny.model.encode_image(models.pixels_to_tensor(tiny, pixels)).float()
    return torch.nn.functional.normalize(emb, dim=-1).numpy()


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, tiny, corpus):
    root = tmp_path_factory.mktemp("search")
    keys = [f"img{i:03d}" for i in range(N_IMAGES)]
    run = make_run(str(root / "run"), corpus.astype(np.float16), keys=keys, shards=2, model=tiny.identity)
    out = root / "idx"
    # text_queries left on auto: the captions are encoded by the runs' model, re-created from its identity.
    build_index(IndexConfig(runs=[run], output=str(out), workers=1, threads=1, queries=10, progress=False))
    return out


def test_index_tuned_on_caption_queries_too(index_dir):
    info = json.loads((index_dir / INDEX_JSON).read_text())
    assert info["factory"] == "Flat"
    assert info["recall"]["text"]["queries"] > 0 and info["recall"]["text"]["at_nprobe"] == 1.0
    assert info["model_key"] == model_key(info["model"])


def test_image_query_finds_the_same_image_first(index_dir):
    with Searcher(str(index_dir)) as s:
        hits = s.search_image([png(7), png(21)], k=3)
    assert [h[0].key for h in hits] == ["img007", "img021"]
    assert hits[0][0].score == pytest.approx(1.0, abs=2e-3)  # float16 storage
    first = hits[0][0]
    assert first.caption == "caption of img007" and first.url == "http://x/img007.jpg" and first.row_id == 7
    assert first.source.startswith("input/")


def test_image_query_from_a_path(index_dir, tmp_path):
    path = tmp_path / "q.png"
    path.write_bytes(png(3))
    with Searcher(str(index_dir)) as s:
        assert s.search_image(str(path), k=1)[0][0].key == "img003"
        with pytest.raises(FileNotFoundError):
            s.search_image(str(tmp_path / "missing.png"))


def test_text_query_matches_brute_force(index_dir, tiny, corpus):
    texts = ["caption of img005", "a red bicycle"]
    with Searcher(str(index_dir)) as s:
        hits = s.search_text(texts, k=5)
        assert s.model.identity["weights_sha256"] == tiny.identity["weights_sha256"]
    q = models.encode_text(tiny, texts)
    exact = np.argsort(-(q @ corpus.astype(np.float16).astype(np.float32).T), axis=1)[:, :5]
    assert [[h.row_id for h in row] for row in hits] == exact.tolist()
    assert all(row[0].score >= row[-1].score for row in hits)


def test_vector_queries_and_their_errors(index_dir, corpus):
    with Searcher(str(index_dir)) as s:
        assert s.search_vectors(corpus[11], k=1)[0][0].key == "img011"
        with pytest.raises(ValueError, match="dimension 32"):
            s.search_vectors(np.zeros((1, 16), np.float32))
        with pytest.raises(ValueError, match="k must be positive"):
            s.search_vectors(corpus[:1], k=0)
    with pytest.raises(ValueError, match="IVF"):
        Searcher(str(index_dir), nprobe=4)


def test_a_query_model_of_other_weights_is_refused(index_dir):
    other = models.bundle_from_config(copy.deepcopy(TINY), seed=1, name="tiny")
    with pytest.raises(IndexModelMismatchError, match="not the model the index was built with"):
        Searcher(str(index_dir), bundle=other)


def test_an_index_whose_model_cannot_be_recreated_is_refused(index_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in os.listdir(index_dir):
        (bad / name).write_bytes((index_dir / name).read_bytes())
    info = json.loads((bad / INDEX_JSON).read_text())
    info["model"]["weights_sha256"] = "0" * 64  # the recorded weights are not what the identity rebuilds
    info["model_key"] = model_key(info["model"])
    (bad / INDEX_JSON).write_text(json.dumps(info))
    with Searcher(str(bad)) as s:
        assert s.search_vectors(np.ones(32, np.float32), k=1)  # vectors need no model
        with pytest.raises(models.ModelMismatchError):
            s.search_text("anything")


def test_on_disk_ivf_index_searched_after_moving(tmp_path, tiny):
    x = clustered(3000, 32, seed=3)
    run = make_run(str(tmp_path / "run"), x, shards=3, model=tiny.identity)
    out = tmp_path / "idx"
    build_index(IndexConfig(runs=[run], output=str(out), workers=1, threads=1, queries=50, progress=False,
                            factory="IVF16,PQ8x4", merge="disk"))
    info = json.loads((out / INDEX_JSON).read_text())
    assert set(info["recall"]) == {"image", "text"} and "at_nprobe" in info["recall"]["text"]
    assert all("text" in row and "image" in row for row in info["tuning"])
    os.rename(out, tmp_path / "moved")
    q = x[:5].astype(np.float32)
    with Searcher(str(tmp_path / "moved"), nprobe=16) as s:
        hits = s.search_vectors(q, k=3)
        assert faiss.extract_index_ivf(s.index).nprobe == 16
    direct = faiss.read_index(str(tmp_path / "moved" / "index.faiss"), faiss.IO_FLAG_ONDISK_SAME_DIR)
    faiss.extract_index_ivf(direct).nprobe = 16
    assert [[h.row_id for h in row] for row in hits] == direct.search(q, 3)[1].tolist()
    assert [row[0].key for row in hits] == [f"k{i:06d}" for i in direct.search(q, 1)[1][:, 0]]


def test_search_from_s3(tmp_path, s3_bucket, corpus, tiny):
    run = make_run(str(tmp_path / "run"), corpus.astype(np.float16), shards=1, model=tiny.identity)
    url = f"s3://{s3_bucket}/idx"
    build_index(IndexConfig(runs=[run], output=url, workers=1, threads=1, queries=10, progress=False,
                            text_queries=False))
    with Searcher(url) as s:
        assert s.search_vectors(corpus[4], k=1)[0][0].key == "k000004"


def test_cli_json_and_table(index_dir, capsys):
    assert search_job.main([str(index_dir), "caption of img002", "-k", "3", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out.strip().splitlines()[0])
    assert doc["query"] == "caption of img002" and len(doc["hits"]) == 3
    assert set(doc["hits"][0]) == {"key", "score", "caption", "url", "source", "row_id"}
    assert search_job.main([str(index_dir), "a red bicycle", "-k", "2"]) == 0
    out = capsys.readouterr().out
    assert "query: a red bicycle" in out and "score" in out and out.count("img") >= 2
    assert search_job.main([str(index_dir)]) == 2
    assert search_job.main([str(index_dir / "nope"), "x"]) == 2


def test_cli_json_stays_clean_for_an_on_disk_index(tmp_path, tiny, capfd):
    x = clustered(2000, 32, seed=4)
    run = make_run(str(tmp_path / "run"), x, shards=2, model=tiny.identity)
    build_index(IndexConfig(runs=[run], output=str(tmp_path / "idx"), workers=1, threads=1, queries=20,
                            progress=False, factory="IVF16,PQ8x4", merge="disk", text_queries=False))
    os.rename(tmp_path / "idx", tmp_path / "moved")  # reading it back makes FAISS print the new .ivfdata path
    capfd.readouterr()
    assert search_job.main([str(tmp_path / "moved"), "a red bicycle", "-k", "2", "--json"]) == 0
    out, err = capfd.readouterr()
    assert [json.loads(line)["query"] for line in out.strip().splitlines()] == ["a red bicycle"]
    assert "IO_FLAG_ONDISK_SAME_DIR" in err


def test_cli_follows_latest_of_a_reindex_root(index_dir, tmp_path, capsys):
    import shutil

    root = tmp_path / "root"
    shutil.copytree(index_dir, root / "indexes" / "v0001")
    (root / "indexes" / "LATEST").write_text(json.dumps({"version": "v0001"}))
    assert search_job.main([str(root), "caption of img002", "-k", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["hits"][0]["key"].startswith("img")


def test_search_warns_when_the_index_was_embedded_with_random_weights(index_dir, tiny, corpus, tmp_path, caplog,
                                                                       capsys):
    """`--model X` without --pretrained embeds with a seeded random init: search says so, a checkpoint does not."""
    page = tmp_path / "r.html"
    assert search_job.main([str(index_dir), "caption of img002", "-k", "1", "--html", str(page)]) == 0
    words = "was embedded with random weights (model tiny, pretrained none, seed 0)"
    assert words in caplog.text and "--pretrained TAG" in caplog.text
    assert words in page.read_text(encoding="utf-8")  # the page says it above the results too
    caplog.clear()
    capsys.readouterr()  # drop what the first search printed: only the second one's words count below
    checkpoint = tmp_path / "tiny.pt"
    torch.save(tiny.model.state_dict(), checkpoint)
    trained = models.bundle_from_config(copy.deepcopy(TINY), name="tiny", weights=str(checkpoint))
    run = make_run(str(tmp_path / "run"), corpus.astype(np.float16), shards=1, model=trained.identity)
    build_index(IndexConfig(runs=[run], output=str(tmp_path / "idx"), workers=1, threads=1, queries=10,
                            text_queries=False, progress=False))
    assert search_job.main([str(tmp_path / "idx"), "caption of img002", "-k", "1"]) == 0
    assert "random weights" not in caplog.text + capsys.readouterr().err
