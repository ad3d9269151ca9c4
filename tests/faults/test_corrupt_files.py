"""Damaged files: a truncated shard, run.json, manifest or errors part, a truncated index.faiss, a binary or
deeply nested reindex YAML. Each job exits 2 with one line naming the file, what is wrong and the way out
(`icar embed --repair` for a run directory), never a traceback or pyarrow's nameless '<Buffer>'.

Run directories are built once without Ray (test_report's builder) and damaged in copies; one end-to-end run on
the session's Ray checks that `--repair` quarantines a damaged part and re-embeds it to the undisturbed rows.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from jobs import embed as embed_job
from jobs import index as index_job
from jobs import reindex as reindex_job
from jobs import report as report_job
from pipeline.io.shards import RunStateError, record_duplicate_keys
from tests.report.test_report import make_run, standard_shards, with_complexity


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A healthy three-part run directory (one part with an errors file), built once."""
    return Path(make_run(str(tmp_path_factory.mktemp("template") / "run"), with_complexity(standard_shards())))


@pytest.fixture()
def run(template, tmp_path) -> Path:
    """A fresh copy of the template run, to damage."""
    return Path(shutil.copytree(template, tmp_path / "run"))


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def last_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert lines, "nothing on stderr"
    assert "Traceback" not in err and "<Buffer>" not in err, err
    return lines[-1]


DAMAGE = {
    "shard": ("shards/part-00001.parquet", lambda p: truncate(p), "--repair"),
    "run.json": ("run.json", lambda p: truncate(p), "--repair"),
    "manifest": ("manifest.parquet", lambda p: p.write_bytes(b"\x00garbage" * 50), "--repair"),
    "errors part": ("errors/part-00000.parquet", lambda p: truncate(p, 0.3), "--repair"),
}


@pytest.mark.parametrize("what", list(DAMAGE))
def test_report_names_the_damaged_file(run, what, capsys):
    name, damage, fix = DAMAGE[what]
    damage(run / name)
    assert report_job.main([str(run)]) == 2
    line = last_line(capsys.readouterr().err)
    assert str(run / name) in line and fix in line and "unreadable" in line


@pytest.mark.parametrize("what", ["shard", "run.json", "manifest"])
def test_index_names_the_damaged_file(run, what, tmp_path, capsys):
    name, damage, fix = DAMAGE[what]
    damage(run / name)
    code = index_job.main([str(run), "--output", str(tmp_path / "idx"), "--add-tasks", "1", "--threads", "1",
                           "--no-text-queries", "--no-progress"])
    assert code == 2
    line = last_line(capsys.readouterr().err)
    assert str(run / name) in line and fix in line


def test_index_names_a_damaged_trained_index(run, tmp_path, capsys):
    junk = tmp_path / "trained.faiss"
    junk.write_bytes(b"not an index at all")
    code = index_job.main([str(run), "--output", str(tmp_path / "idx"), "--add-tasks", "1", "--threads", "1",
                           "--no-text-queries", "--no-progress", "--trained-index", str(junk), "--factory", "Flat"])
    assert code == 2
    line = last_line(capsys.readouterr().err)
    assert str(junk) in line and "--trained-index" in line


@pytest.mark.parametrize("what", ["run.json", "manifest"])
def test_embed_resume_refuses_before_ray(run, what, tmp_path, capsys):
    """A damaged run.json or manifest stops a resumed embed at once (no Ray, no model), naming it and --repair."""
    name, damage, fix = DAMAGE[what]
    damage(run / name)
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "a.jpg").write_bytes(b"not needed: the run stops before reading inputs")
    assert embed_job.main([str(inputs), "--output", str(run), "--no-progress"]) == 2
    line = last_line(capsys.readouterr().err)
    assert str(run / name) in line and fix in line


def test_duplicate_key_check_names_a_damaged_shard(run):
    """The end-of-run duplicate check reads every shard: a damaged one is named, with --repair."""
    from pipeline.io.storage import CorruptFileError

    truncate(run / "shards/part-00002.parquet")
    rows = pq.read_table(run / "manifest.parquet").to_pylist()
    with pytest.raises(CorruptFileError, match="part-00002.parquet.*--repair"):
        record_duplicate_keys(str(run), rows)


def test_repair_quarantines_a_damaged_part_and_drops_its_row(run):
    from pipeline.io.repair import repair_run

    truncate(run / "shards/part-00001.parquet")
    damaged = (run / "shards/part-00001.parquet").read_bytes()
    moved = repair_run(str(run))
    assert [Path(m).relative_to(run).parts[2:] for m in moved] == [("shards", "part-00001.parquet"),
                                                                  ("errors", "part-00001.parquet")]
    assert Path(moved[0]).read_bytes() == damaged  # the evidence is kept as it was
    assert not (run / "shards/part-00001.parquet").exists()
    assert [r["part"] for r in pq.read_table(run / "manifest.parquet").to_pylist()] == [0, 2]
    assert repair_run(str(run)) == []  # a healthy run: nothing moved


def test_repair_of_a_damaged_manifest_quarantines_every_part(run):
    from pipeline.io.repair import repair_run
    from pipeline.io.shards import QUARANTINE_DIR

    (run / "manifest.parquet").write_bytes(b"garbage")
    moved = repair_run(str(run))
    assert {Path(m).name for m in moved} == {"manifest.parquet", "part-00000.parquet", "part-00001.parquet",
                                             "part-00002.parquet"}
    assert not list((run / "shards").iterdir()) and (run / "run.json").exists()
    assert len(list((run / QUARANTINE_DIR).rglob("*.parquet"))) == 6  # 3 shards, 2 errors parts, the manifest


def test_run_json_is_rederived_only_for_the_run_s_own_model(run):
    """--repair rewrites a damaged run.json only when the shards' dimension, exits and GFLOPs fit the model."""
    from pipeline.io.repair import check_shards_fit

    description = json.loads((run / "run.json").read_text())
    rows = pq.read_table(run / "manifest.parquet").to_pylist()
    check_shards_fit(str(run), rows, description)
    with pytest.raises(RunStateError, match="GFLOPs"):
        check_shards_fit(str(run), rows, dict(description, gflops_per_exit={"6": 1.0, "9": 2.0, "12": 3.0}))
    with pytest.raises(RunStateError, match="not an exit"):
        check_shards_fit(str(run), rows, dict(description, gflops_per_exit={"12": 8.82}))
    with pytest.raises(RunStateError, match="8-dimensional|4-dimensional"):
        check_shards_fit(str(run), rows, dict(description, embed_dim=8))


# ------------------------------------------------------------------------------------------- index, YAML


def test_search_names_a_truncated_index(tmp_path, capsys):
    from jobs import search as search_job
    from pipeline.index.build import IndexConfig, build_index
    from tests.index.test_index import make_run as make_index_run

    vectors = np.random.default_rng(0).normal(size=(40, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    run = make_index_run(str(tmp_path / "run"), vectors.astype(np.float16), shards=2)
    idx = tmp_path / "idx"
    build_index(IndexConfig(runs=[run], output=str(idx), workers=1, threads=1, queries=5, text_queries=False,
                            progress=False))
    truncate(idx / "index.faiss")
    assert search_job.main([str(idx), "a red bicycle"]) == 2
    line = last_line(capsys.readouterr().err)
    assert str(idx / "index.faiss") in line and "truncated" in line and "icar index" in line


@pytest.mark.parametrize("content", [bytes(range(256)) * 8, ("a: " + "[" * 10000 + "]" * 10000 + "\n").encode()],
                         ids=["binary", "10000-deep"])
def test_reindex_config_that_is_binary_or_deeply_nested(tmp_path, content, capsys):
    config = tmp_path / "job.yaml"
    config.write_bytes(content)
    assert reindex_job.main(["--config", str(config), "--check-config"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and str(config) in err


# ------------------------------------------------------------------------------------- --repair end to end


def test_repair_re_embeds_a_damaged_part_to_the_undisturbed_rows(tmp_path, ray_session, capsys):
    from pipeline.io.shards import QUARANTINE_DIR
    from tests.embed.test_embed import jpeg, write_tar

    rng = np.random.default_rng(3)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for s in range(2):
        write_tar(corpus / f"{s:05d}.tar", [(f"{s}-{i}", jpeg(rng, 64, 48), f"image {i}") for i in range(3)])
    out = tmp_path / "run"
    args = [str(corpus / "*.tar"), "--output", str(out), "--model", "demo", "--scorer", "heuristic", "--full-depth",
            "--batch-size", "4", "--decode-tasks", "1", "--no-progress"]
    assert embed_job.main(args) == 0
    reference = pq.read_table(out / "shards/part-00001.parquet")
    truncate(out / "shards/part-00001.parquet")
    capsys.readouterr()

    assert embed_job.main(args) == 2  # resume: every input is committed, the duplicate check finds the damage
    line = last_line(capsys.readouterr().err)
    assert str(out / "shards/part-00001.parquet") in line and "--repair" in line

    truncate(out / "run.json", 0.6)
    assert embed_job.main(args + ["--repair"]) == 0
    quarantined = sorted(p.relative_to(out / QUARANTINE_DIR).parts[1:] for p in (out / QUARANTINE_DIR).rglob("*")
                         if p.is_file())
    assert quarantined == [("run.json",), ("shards", "part-00001.parquet")]
    repaired = pq.read_table(out / "shards/part-00001.parquet")
    assert repaired.column("key").to_pylist() == reference.column("key").to_pylist()
    assert repaired.column("embedding").to_pylist() == reference.column("embedding").to_pylist()
    assert json.loads((out / "run.json").read_text())["model"]["name"] == "demo"
    assert report_job.main([str(out)]) == 0
