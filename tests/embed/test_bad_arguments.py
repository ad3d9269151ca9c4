"""Bad arguments end at once with exit 2 and one line naming the option, the value and the fix (issue 18).

`icar embed` cases run jobs.embed.main in-process with Ray's start replaced by a failure: a value that got past
the driver's checks would fail the test there, instead of costing the 20-70 s of Ray and model start-up the
user used to wait for. `icar search` cases use a tiny real FAISS index.
"""

from __future__ import annotations

import copy
import json
import os
import time

import numpy as np
import pytest

from jobs import embed as embed_job
from pipeline.embed import validate
from pipeline.model.scorer_identity import DEFAULT_CHECKPOINT, SHIPPED_NAME, checkpoint_identity

BEFORE_RAY_S = 5.0  # a check that took longer would be no better than starting Ray


@pytest.fixture()
def no_ray(monkeypatch):
    """Make any start of Ray fail the test."""
    import pipeline.embed.execution as execution

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started: the bad argument got past the driver's checks")

    monkeypatch.setattr(execution, "init_ray", refuse)


@pytest.fixture()
def images(tmp_path):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(folder / "a.jpg")
    return folder


def embed_cli(argv: list[str], capsys) -> tuple[int, list[str], float]:
    """Return (exit code, stderr lines, seconds) of `icar embed argv` run in-process."""
    t0 = time.perf_counter()
    try:
        code = embed_job.main(argv)
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    return code, capsys.readouterr().err.strip().splitlines(), time.perf_counter() - t0


def write_router(path, scorer: dict, exits=(6, 9, 12)) -> str:
    path.write_text(json.dumps({"format": 1, "kind": "threshold", "exits": list(exits), "thresholds": [0.3, 0.6],
                                "scorer": scorer}))
    return str(path)


def shipped_scorer() -> dict:
    """Return the identity `--scorer default` records for a non-demo model: the shipped trained checkpoint."""
    return {**checkpoint_identity(DEFAULT_CHECKPOINT), "checkpoint": SHIPPED_NAME, "name": "complexity-net:x"}


# (case id, extra arguments or a function of tmp_path returning them or (inputs, them), what the line must say)
EMBED_CASES = [
    ("unknown-model", ["--model", "ViT-B-33"], ["--model ViT-B-33", "ViT-B-32"]),
    ("uncached-pretrained", ["--model", "ViT-B-32", "--pretrained", "openai"],
     ["--pretrained openai", "not in the cache", "--pretrained FILE"]),
    ("unknown-tag", ["--model", "ViT-B-32", "--pretrained", "laion9b"], ["--pretrained laion9b", "laion2b_s34b_b79k"]),
    ("missing-checkpoint", ["--model", "ViT-B-32", "--pretrained", "nope.safetensors"],
     ["--pretrained nope.safetensors", "no such checkpoint file"]),
    ("exit-at-beyond-tower", ["--exit-at", "99"], ["--exit-at 99", "8 blocks", "1..8"]),
    ("exits-beyond-tower", ["--model", "ViT-B-32", "--pretrained", "none", "--exits", "6,12,24"],
     ["--exits 6,12,24", "1..12"]),
    ("demo-router-other-heuristic", ["--scorer", "heuristic"],
     ["pipeline/assets/demo/router.json", "64 px", "128 px", "pass --scorer default", "icar calibrate"]),
    ("router-for-shipped-scorer", lambda tmp: ["--model", "ViT-B-32", "--pretrained", "none", "--scorer", "heuristic",
                                               "--router", write_router(tmp / "r.json", shipped_scorer())],
     ["convnext", "heuristic (sobel_edge_density, 128 px", "pass --scorer default to score"]),
    ("router-for-shipped-scorer-on-demo", lambda tmp: ["--router", write_router(tmp / "r.json", shipped_scorer(),
                                                                                 exits=(4, 6, 8))],
     ["64 px", f"pass --scorer convnext --checkpoint {DEFAULT_CHECKPOINT}"]),
    ("router-without-scorer", ["--scorer", "none"], ["--scorer none", "routes by complexity score"]),
    ("two-routings", ["--full-depth", "--exit-at", "4"], ["--full-depth and --exit-at", "choose one"]),
    ("output-is-a-file", lambda tmp: ["--output", str(_file(tmp))], ["is a file, not a directory"]),
    ("output-under-a-file", lambda tmp: ["--output", str(_file(tmp) / "run")], ["is a file, so no directory"]),
    ("output-empty", ["--output", ""], ["--output ''", "empty", "--output runs/demo"]),
    ("output-inside-input", lambda tmp: ["--output", str(tmp / "imgs" / "run")],
     ["inside the input", "outside the inputs"]),
    ("output-matched-by-input-glob", lambda tmp: ([str(tmp / "*")], ["--output", str(tmp / "run")]),
     ["inside the input", "*"]),
    # argparse refuses these itself (exit 2, usage and one error line naming the option)
    ("num-actors-0", ["--num-actors", "0"], ["argument --num-actors", "at least 1", "'0'"]),
    ("batch-size-0", ["--batch-size", "0"], ["argument --batch-size", "at least 1"]),
    ("batch-size-negative", ["--batch-size", "-3"], ["argument --batch-size", "'-3'"]),
    ("decode-tasks-0", ["--decode-tasks", "0"], ["argument --decode-tasks", "at least 1"]),
    ("shard-retries-negative", ["--shard-retries", "-1"], ["argument --shard-retries", "at least 0"]),
    ("max-pixels-0", ["--max-pixels", "0"], ["argument --max-pixels", "at least 1"]),
    ("shard-timeout-0", ["--shard-timeout", "0"], ["argument --shard-timeout", "above 0"]),
]


def _file(tmp_path):
    path = tmp_path / "a-file"
    path.write_text("not a directory")
    return path


@pytest.mark.parametrize("extra,says", [c[1:] for c in EMBED_CASES], ids=[c[0] for c in EMBED_CASES])
def test_embed_refuses_bad_arguments_before_ray(extra, says, tmp_path, images, no_ray, capsys, monkeypatch):
    # No cached open_clip weights and no network for them: what an offline cluster node sees.
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    extra = extra(tmp_path) if callable(extra) else extra
    inputs, extra = extra if isinstance(extra, tuple) else ([str(images)], extra)
    argv = [*inputs, "--output", str(tmp_path / "run"), "--no-progress", *extra]
    code, err, seconds = embed_cli(argv, capsys)
    assert code == 2, err
    line = err[-1]
    if "argument --" not in line:  # ours: exactly one line, no traceback, not cut short
        assert len(err) == 1, err
    assert line.startswith("icar embed: error: ")
    for text in says:
        assert text in line, line
    assert seconds < BEFORE_RAY_S
    assert not (tmp_path / "run").exists() and not (images / "run").exists()


def test_router_mismatch_message_is_whole(tmp_path, images, no_ray, capsys):
    code, err, _ = embed_cli([str(images), "--output", str(tmp_path / "run"), "--scorer", "heuristic"], capsys)
    assert code == 2 and len(err) == 1
    assert err[0].endswith("`icar calibrate ... --model demo --scorer heuristic`")
    assert "--scorer convnext" not in err[0]  # it would need a checkpoint: not a fix that works


def test_read_only_output_is_refused(tmp_path, images, no_ray, capsys, monkeypatch):
    # Tests run as root, whom no permission bit stops: stand in for a read-only mount at the access check.
    parent = tmp_path / "ro"
    parent.mkdir()
    real_access = os.access
    monkeypatch.setattr(validate.os, "access", lambda p, mode: False if str(p) == str(parent)
                        else real_access(p, mode))
    code, err, _ = embed_cli([str(images), "--output", str(parent / "run")], capsys)
    assert code == 2 and len(err) == 1 and "read-only" in err[0] and str(parent) in err[0]


def test_good_arguments_pass_the_checks(tmp_path, images, monkeypatch):
    """The checks refuse only what fails: the demo, a cached tag, a random init, a matching router all pass."""
    from pipeline.embed.config import EmbedConfig
    from pipeline.model.spec import ModelSpec

    cache = tmp_path / "hf-cache"
    snapshot = cache / "models--timm--vit_base_patch32_clip_224.openai" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    (snapshot / "open_clip_model.safetensors").write_bytes(b"weights")
    (cache / "models--timm--vit_base_patch32_clip_224.openai" / "refs").mkdir()
    (cache / "models--timm--vit_base_patch32_clip_224.openai" / "refs" / "main").write_text("0123abc")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = str(tmp_path / "run")
    router = write_router(tmp_path / "r.json", shipped_scorer())
    for spec in (ModelSpec(), ModelSpec(scorer="heuristic", full_depth=True), ModelSpec(exits=[4, 8], exit_at=4),
                 ModelSpec(model="ViT-B-32", pretrained="openai"), ModelSpec(model="ViT-B-32", pretrained="none"),
                 ModelSpec(model="ViT-B-32", pretrained="none", router=router),
                 ModelSpec(model="RN50", pretrained="none", full_depth=True)):
        validate.check_embed(EmbedConfig(inputs=[str(images), str(tmp_path / "*.tar")], output=out, spec=spec))
    validate.check_embed(EmbedConfig(inputs=["s3://bucket/shards/*.tar"], output="s3://bucket/runs/x"))
    assert not os.path.exists(out)


# ------------------------------------------------------------------------------------------------ search

faiss = pytest.importorskip("faiss")

# Keys, captions and URLs as an attacker would write them: set the window title, clear the screen, reverse text.
NASTY = ["title\x1b]0;pwned\x07", "clear\x1b[2J\x1b[H", "c1\x9b31m", "bidi\u202eevil", "del\x7fx"]


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory):
    from pipeline.model import models
    from pipeline.index.build import IndexConfig, build_index
    from tests.index.test_index import make_run
    from tests.index.test_search import TINY

    tiny = models.bundle_from_config(copy.deepcopy(TINY), seed=0, name="tiny")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    keys = NASTY + [f"img{i:03d}" for i in range(40 - len(NASTY))]
    root = tmp_path_factory.mktemp("bad-args-search")
    run = make_run(str(root / "run"), x.astype(np.float16), keys=keys, shards=1, model=tiny.identity)
    build_index(IndexConfig(runs=[run], output=str(root / "idx"), workers=1, threads=1, queries=10, progress=False,
                            text_queries=False))
    return root / "idx"


def search_cli(argv: list[str], capsys) -> tuple[int, str, list[str], float]:
    from jobs import search as search_job

    t0 = time.perf_counter()
    code = search_job.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip().splitlines(), time.perf_counter() - t0


@pytest.mark.parametrize("extra,says", [(["-k", "1000000000"], "-k 1000000000"), (["-k", "0"], "-k 0"),
                                        (["-k", "-5"], "-k -5"), (["--nprobe", "0"], "--nprobe 0")],
                         ids=["k-huge", "k-0", "k-negative", "nprobe-0"])
def test_search_refuses_absurd_counts(index_dir, capsys, extra, says):
    code, out, err, seconds = search_cli([str(index_dir), "a red bicycle", *extra], capsys)
    assert code == 2 and out == "" and len(err) == 1 and err[0].startswith(f"icar search: error: {says}:"), err
    assert seconds < BEFORE_RAY_S  # refused before the query model loads


def test_search_caps_k_at_the_index_and_bounds_a_query_batch(index_dir, monkeypatch):
    """FAISS allocates queries x k results up front: k is capped at the vectors held, queries go in batches."""
    from pipeline.index import search

    monkeypatch.setattr(search, "QUERY_BATCH_BYTES", 16 * 40 * 3)  # three queries of 40 results per batch
    calls = []
    with search.Searcher(str(index_dir)) as s:
        real = s.index

        class Spy:
            ntotal = real.ntotal

            def search(self, q, k):
                calls.append((len(q), k))
                assert len(q) * k * 16 <= search.QUERY_BATCH_BYTES, "a query batch beyond the memory budget"
                return real.search(q, k)

        s.index = Spy()
        queries = np.random.default_rng(1).standard_normal((7, 32)).astype(np.float32)
        hits = s.search_vectors(queries, k=10**9)
    assert calls == [(3, 40), (3, 40), (1, 40)]
    assert len(hits) == 7 and all(len(h) == 40 for h in hits)


def test_search_table_escapes_control_characters_and_json_stays_exact(index_dir, capsys):
    code, out, _, _ = search_cli([str(index_dir), "anything", "-k", "40"], capsys)
    assert code == 0
    for bad in ("\x1b", "\x07", "\x9b", "\x7f", "\u202e"):
        assert bad not in out
    assert "title\\x1b]0;pwned\\x07" in out and "clear\\x1b[2J\\x1b[H" in out and "bidi\\u202eevil" in out
    assert "caption of c1\\x9b31m" in out and "http://x/del\\x7fx.jpg" in out
    code, out, _, _ = search_cli([str(index_dir), "anything", "-k", "40", "--json"], capsys)
    hits = json.loads(out)["hits"]
    assert code == 0 and {h["key"] for h in hits} >= set(NASTY)
    assert {h["caption"] for h in hits} >= {f"caption of {k}" for k in NASTY}
