"""`icar search --html`: one self-contained page of results, thumbnails read back from tar, Parquet, folder and S3
sources, rendered by a real headless Chromium.

The run is written here the way `icar embed` writes one (rows keyed and sourced by the real readers, embeddings from
the tiny model's full-depth tower), so the page is checked against known exit depths and complexities.
"""

from __future__ import annotations

import base64
import copy
import html
import io
import os
import re
import subprocess
import tempfile

import numpy as np
import pyarrow as pa
import pytest

faiss = pytest.importorskip("faiss")
torch = pytest.importorskip("torch")

from PIL import Image  # noqa: E402
from zoo import (ShardSample, make_corpus, tar_bytes, write_image_folder, write_parquet_shard,  # noqa: E402
                 write_tar_shard)

from jobs import search as search_job  # noqa: E402
from pipeline.index.build import IndexConfig, build_index  # noqa: E402
from pipeline.io import storage  # noqa: E402
from pipeline.io.decode import DecodeConfig, decode_image  # noqa: E402
from pipeline.io.readers import expand_inputs, iter_samples  # noqa: E402
from pipeline.io.schema import MANIFEST, MANIFEST_SCHEMA, RUN_JSON, part_name, shard_schema  # noqa: E402
from pipeline.model import models  # noqa: E402
from pipeline.report.gallery import THUMB_PX  # noqa: E402

TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
CHROMIUM = "/usr/bin/chromium"
# Appended to a copy of the page (the page itself holds no script): counts the images the browser decoded.
DECODE_PROBE = ("<script>Promise.all([...document.images].map(i => i.decode().then(() => i.naturalWidth > 0 ? 1 : 0, "
                "() => 0))).then(r => document.body.setAttribute('data-decoded', r.reduce((a, b) => a + b, 0) + '/' "
                "+ r.length));</script>")
HOSTILE = 'a <script>alert("x")</script> & "quoted" caption'


@pytest.fixture(autouse=True, scope="module")
def one_faiss_thread():
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


@pytest.fixture(scope="module")
def tiny():
    return models.bundle_from_config(copy.deepcopy(TINY), seed=0, name="tiny")


def write_run(run: str, tiny, sources: list[str], storage_options: dict | None = None) -> list[dict]:
    """Write a run directory over ``sources`` as `icar embed` would (one part per source); return its rows."""
    rows, manifest = [], []
    for part, url in enumerate(sources):
        (shard,) = expand_inputs([url], storage_options)
        samples = list(iter_samples(shard, storage_options))
        pixels = np.stack([decode_image(s.data, DecodeConfig(image_size=tiny.image_size)).pixels for s in samples])
        with torch.no_grad():
            emb = torch.nn.functional.normalize(tiny.model.encode_image(models.pixels_to_tensor(tiny, pixels)).float(),
                                                dim=-1).numpy()
        part_rows = [{"key": s.key, "source": s.source, "caption": s.caption, "url": s.url, "width": 32, "height": 32,
                      "complexity": round(0.1 * (len(rows) + i), 2), "exit_layer": 1 + (len(rows) + i) % 2,
                      "gflops": 1.0, "embedding": emb[i].astype(np.float16).tolist()}
                     for i, s in enumerate(samples)]
        rows += part_rows
        table = pa.Table.from_pylist(part_rows, schema=shard_schema(TINY["embed_dim"]))
        storage.write_parquet(table, storage.join(run, "shards", part_name(part)), storage_options)
        manifest.append({"source": shard.uri, "output": f"shards/{part_name(part)}", "part": part,
                         "rows": len(part_rows), "errors": 0, "gflops": 1.0, "scorer_gflops": 0.0, "seconds": 1.0,
                         "model_seconds": 1.0, "source_size": None, "source_mtime": None, "source_etag": None,
                         "exit_counts": "{}", "complexity_mean": None, "complexity_p10": None, "complexity_p50": None,
                         "complexity_p90": None, "committed_at": "2026-01-01T00:00:00+00:00"})
    storage.write_parquet(pa.Table.from_pylist(manifest, schema=MANIFEST_SCHEMA), storage.join(run, MANIFEST),
                          storage_options)
    storage.write_json({"model": tiny.identity, "exits": [1, 2], "heads": None}, storage.join(run, RUN_JSON),
                       storage_options)
    return rows


def decoded_in_chromium(page: str, tmp_path) -> str:
    """Return "decoded/total" images of ``page`` as headless Chromium counts them."""
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", DECODE_PROBE + "</body>"), encoding="utf-8")
    for attempt in range(2):  # on a loaded machine a renderer can die before the count is set: once more then
        with tempfile.TemporaryDirectory() as profile:
            proc = subprocess.run(
                [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}", "--virtual-time-budget=30000", "--dump-dom", probe.as_uri()],
                capture_output=True, text=True, timeout=180)
        found = re.search(r'data-decoded="(\d+/\d+)"', proc.stdout)
        if found:
            return found.group(1)
    raise AssertionError(f"Chromium set no count (exit {proc.returncode}); stdout ends {proc.stdout[-300:]!r}; "
                         f"stderr ends {proc.stderr[-1500:]!r}")


def tiles(page: str) -> list[dict]:
    """Return each result tile of the page: key, thumbnail size (or None), score/exit/complexity line, caption."""
    out = []
    for m in re.finditer(r'<figure data-key="([^"]*)"[^>]*>(.*?)</figure>', page):
        body = m.group(2)
        img = re.search(r'src="data:image/jpeg;base64,([^"]+)"', body)
        size = Image.open(io.BytesIO(base64.b64decode(img.group(1)))).size if img else None
        cap = re.search(r'<div class="cap">(.*?)</div>', body)
        out.append({"key": html.unescape(m.group(1)), "size": size,
                    "nums": re.search(r'<div class="nums">(.*?)</div>', body).group(1),
                    "caption": html.unescape(cap.group(1)) if cap else None, "body": body})
    return out


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian's chromium is not installed (apt-get install -y "
                                                         "chromium): cannot render the results page")
def test_search_html_shows_every_result_from_tar_parquet_folder_and_s3(tmp_path, tiny, s3_bucket, capsys):
    corpus = make_corpus(np.random.default_rng(3), 12, min_side=40, max_side=90)
    corpus[0] = ShardSample(corpus[0].key, corpus[0].image, corpus[0].ext, HOSTILE + "\n")
    (tmp_path / "in").mkdir()
    tar = write_tar_shard(tmp_path / "in" / "a.tar", corpus[:3])
    parquet = write_parquet_shard(tmp_path / "in" / "b.parquet", corpus[3:6])
    write_image_folder(tmp_path / "folder", [ShardSample(f"sub/{c.key}", c.image, c.ext, c.caption)
                                             for c in corpus[6:9]])
    storage.atomic_write_bytes(f"s3://{s3_bucket}/shards/c.tar", tar_bytes(corpus[9:11]))
    storage.atomic_write_bytes(f"s3://{s3_bucket}/imgs/d/{corpus[11].key}.{corpus[11].ext}", corpus[11].image)
    rows = write_run(str(tmp_path / "run"), tiny, [tar, parquet, str(tmp_path / "folder"),
                                                   f"s3://{s3_bucket}/shards/c.tar", f"s3://{s3_bucket}/imgs"])
    assert rows[-1]["source"] == f"s3://{s3_bucket}/imgs#0000000-0000999" and rows[-1]["key"] == f"d/{corpus[11].key}"
    assert {r["key"] for r in rows[6:9]} == {f"sub/{c.key}" for c in corpus[6:9]}  # folder keys: no extension
    idx = tmp_path / "idx"
    build_index(IndexConfig(runs=[str(tmp_path / "run")], output=str(idx), workers=1, threads=1, queries=5,
                            text_queries=False, progress=False))
    query_image = tmp_path / "query.png"
    query_image.write_bytes(corpus[7].image)
    page_path = tmp_path / "out" / "results.html"
    rc = search_job.main([str(idx), "a photo", "--image", str(query_image), "-k", "12", "--html", str(page_path)])
    assert rc == 0
    assert f"icar search: wrote {page_path}" in capsys.readouterr().err
    page = page_path.read_text(encoding="utf-8")

    # Self-contained, all text escaped: no script, nothing fetched from anywhere.
    assert "<script" not in page and not re.search(r'(src|href)="(?!data:)', page)
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &quot;quoted&quot;" in page
    results = tiles(page)
    assert len(results) == 2 * 12 and page.count("<img ") == 2 * 12 + 1  # two queries of 12, and the query image
    by_key = {r["key"]: r for r in rows}
    assert sorted({t["key"] for t in results}) == sorted(by_key)
    for t in results:
        row = by_key[t["key"]]
        assert t["size"] == (THUMB_PX, THUMB_PX), t["key"]  # every result, from every kind of source, has its image
        assert f"exit {row['exit_layer']} · complexity {row['complexity']:.2f}" in t["nums"]
        assert t["caption"] == row["caption"]
    assert by_key[corpus[0].key]["caption"] == HOSTILE  # the .txt's trailing newline is gone
    # The image query shows its image above its results, and finds itself first.
    image_section = page[page.index("image query:"):]
    assert image_section.index("<img ") < image_section.index("<figure data-key=")
    assert tiles(image_section)[0]["key"] == rows[7]["key"]

    assert decoded_in_chromium(page, tmp_path) == "25/25"


def test_search_html_says_which_images_could_not_be_read(tmp_path, tiny, capsys, caplog):
    corpus = make_corpus(np.random.default_rng(4), 4, min_side=40, max_side=90)
    tar = write_tar_shard(tmp_path / "a.tar", corpus[:2])
    write_image_folder(tmp_path / "folder", corpus[2:])
    write_run(str(tmp_path / "run"), tiny, [tar, str(tmp_path / "folder")])
    idx = tmp_path / "idx"
    build_index(IndexConfig(runs=[str(tmp_path / "run")], output=str(idx), workers=1, threads=1, queries=4,
                            text_queries=False, progress=False))
    os.remove(tar)  # the input moved away since it was embedded
    os.remove(tmp_path / "folder" / f"{corpus[2].key}.{corpus[2].ext}")
    page_path = tmp_path / "r.html"
    assert search_job.main([str(idx), "a photo", "-k", "4", "--html", str(page_path)]) == 0
    shown = {t["key"]: t for t in tiles(page_path.read_text(encoding="utf-8"))}
    assert shown[corpus[3].key]["size"] == (THUMB_PX, THUMB_PX)
    for key in (corpus[0].key, corpus[1].key):
        assert shown[key]["size"] is None and "source not readable" in shown[key]["body"]
        assert "does not exist" in shown[key]["body"]
    assert shown[corpus[2].key]["size"] is None and "key not found" in shown[corpus[2].key]["body"]
    assert "3 of 4 result images could not be shown" in caplog.text
