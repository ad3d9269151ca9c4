"""`icar embed` start-up and what it tells people: a resume with nothing to do starts no Ray, progress counts
images, surprising defaults are said (random weights, an --exit-at no head was trained for, a scorer that routes
nothing), and log lines to a file or a pipe carry no colour codes."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs import embed as embed_job
from pipeline.embed import validate
from pipeline.embed.config import EmbedConfig
from pipeline.embed.execution import EmbedSummary, run_json_notes
from pipeline.embed.progress import Progress, SampleTotals, count_samples
from pipeline.io.readers import expand_inputs
from pipeline.model.spec import ModelSpec
from pipeline.report.build import ReportConfig, build_report, render_text, summary_line

REPO = Path(__file__).resolve().parents[2]
ANSI = "\x1b["


def jpeg(seed: int, w: int = 48, h: int = 40) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def write_tar(path: Path, keys: list[str]) -> None:
    with tarfile.open(path, "w") as tar:
        for i, key in enumerate(keys):
            for name, payload in ((f"{key}.jpg", jpeg(i)), (f"{key}.txt", f"caption {key}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Two tars (5 and 4 samples) and a Parquet file of 3: 12 samples in all."""
    root = tmp_path_factory.mktemp("startup-corpus")
    write_tar(root / "00000.tar", [f"a{i}" for i in range(5)])
    write_tar(root / "00001.tar", [f"b{i}" for i in range(4)])
    pq.write_table(pa.table({"key": [f"p{i}" for i in range(3)], "jpg": [jpeg(10 + i) for i in range(3)]}),
                   root / "more.parquet")
    return root


def icar_embed(args: list[str], check_ray: bool = False) -> subprocess.CompletedProcess:
    """Run `icar embed ARGS` in a fresh interpreter, stdout and stderr piped (not a terminal)."""
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_COLOR_PREFIX", None)  # the job decides, as for a user who never heard of it
    code = ("import sys\nfrom jobs import embed\nfrom pipeline.logs import setup_logging\nsetup_logging()\n"
            "code = embed.main(sys.argv[1:])\n"
            "ray = sys.modules.get('ray')\n"
            "print('RAY STARTED' if ray is not None and ray.is_initialized() else 'NO RAY')\n"
            "raise SystemExit(code)\n")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=600)


# ------------------------------------------------------------------------------------ the run, then its resume


@pytest.fixture(scope="module")
def piped_run(corpus, tmp_path_factory):
    """A demo run through the CLI with its output piped, then the same command again (nothing left to do)."""
    out = tmp_path_factory.mktemp("startup-runs") / "run"
    args = [str(corpus / "*.tar"), str(corpus / "more.parquet"), "--output", str(out), "--batch-size", "4"]
    first = icar_embed(args)
    again = icar_embed(args)
    return out, first, again


def test_first_run_says_progress_in_images_without_colour_codes(piped_run):
    out, first, _ = piped_run
    assert first.returncode == 0, first.stderr[-3000:]
    assert "RAY STARTED" in first.stdout
    # The last progress line counts images against the total read from tar headers and Parquet footers, and
    # matches the summary.
    assert "embed: 12/12 images (100%)" in first.stderr, first.stderr[-3000:]
    assert "icar embed: 12 images, 0 errors, 3 shards committed" in first.stdout
    # Ray's worker lines reached the driver (the actor logs its model), with plain prefixes.
    assert "(ModelActor pid=" in first.stderr
    assert ANSI not in first.stderr and ANSI not in first.stdout
    run = json.loads((out / "run.json").read_text())
    # The demo carries its own weights, and its shipped router routes by the score.
    assert run["random_weights"] is False and run["routes_by_score"] is True
    assert any(path.endswith("demo/clip.safetensors") for path in run["spec_files"])


def test_a_resume_loads_the_model_when_its_files_changed(tmp_path):
    """Nothing to embed skips the model only while the spec and the files it loads are the run's own."""
    from dataclasses import asdict

    from pipeline.embed.execution import same_model

    heads = tmp_path / "heads.safetensors"
    heads.write_bytes(b"x" * 10)
    spec = ModelSpec(model="ViT-B-32", pretrained="none", heads=str(heads), scorer="heuristic")
    run_json = json.loads(json.dumps({"spec": asdict(spec), "spec_files": validate.spec_files(spec)}))
    assert same_model(run_json, spec)
    assert same_model(run_json, ModelSpec(**{**asdict(spec), "torch_threads": 3}))  # runtime options may differ
    assert not same_model(run_json, ModelSpec(**{**asdict(spec), "exit_at": 6}))
    heads.write_bytes(b"y" * 11)  # replaced in place under the same path
    assert not same_model(run_json, spec)
    assert not same_model({"spec": asdict(spec)}, spec)  # a run.json from before spec_files: load and check


def test_confidence_heads_retrained_in_place_are_noticed(tmp_path):
    """A confidence router names its heads by path: heads rewritten under that path leave the router file as it was,
    so a resume with nothing to do must look at the heads file itself (found beside the router, as the worker does)."""
    from dataclasses import asdict

    from pipeline.embed.execution import same_model

    heads = tmp_path / "confidence_heads.safetensors"
    heads.write_bytes(b"x" * 10)
    router = tmp_path / "conf-router.json"
    router.write_text(json.dumps({"kind": "confidence", "confidence": {"path": "/moved/away/confidence_heads.safetensors",
                                                                      "sha256": "0" * 64}}))
    spec = ModelSpec(model="ViT-B-32", pretrained="none", router=str(router), scorer="none")
    files = validate.spec_files(spec)
    assert str(heads) in files and str(router) in files
    run_json = json.loads(json.dumps({"spec": asdict(spec), "spec_files": files}))
    assert same_model(run_json, spec)
    heads.write_bytes(b"y" * 11)
    assert not same_model(run_json, spec)
    router.write_text("not json")  # a broken router is for loading it to report, not for this check
    assert str(router) in validate.spec_files(spec)


def test_resume_with_nothing_to_do_starts_no_ray(piped_run):
    out, first, again = piped_run
    assert again.returncode == 0, again.stderr[-3000:]
    assert "NO RAY" in again.stdout
    assert "(ModelActor" not in again.stderr  # no model actor was started either
    assert "icar embed: 0 images, 0 errors, 0 shards committed (3 already done, 0 failed)" in again.stdout
    assert "report: 12 images, 0 failed" in again.stdout  # the summary of the whole run directory
    invocations = json.loads((out / "run.json").read_text())["invocations"]
    assert [i["images"] for i in invocations] == [12, 0]
    # What each invocation waited for before its first batch: the resume only planned.
    assert set(invocations[0]["startup_seconds"]) == {"plan", "ray", "model"}
    assert set(invocations[1]["startup_seconds"]) == {"plan"}


# ------------------------------------------------------------------------------------------ progress in images


def test_sample_counts_come_from_each_format(corpus, tmp_path):
    shards = {Path(s.uri).name: s for s in expand_inputs([str(corpus / "*.tar"), str(corpus / "more.parquet")])}
    assert count_samples(shards["00000.tar"]) == 5 and count_samples(shards["00001.tar"]) == 4
    assert count_samples(shards["more.parquet"]) == 3
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(7):
        (folder / f"{i}.jpg").write_bytes(jpeg(i))
    folder_shards = expand_inputs([str(folder)], folder_shard_size=3)
    assert [count_samples(s) for s in folder_shards] == [3, 3, 1]
    assert SampleTotals(list(shards.values()) + folder_shards).wait(60) == 19
    # A shard whose count cannot be known leaves the total unknown (no guessing).
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    broken = expand_inputs([str(tmp_path / "broken.parquet")])
    assert count_samples(broken[0]) is None
    assert SampleTotals(list(shards.values()) + broken).wait(60) is None


def test_progress_to_a_pipe_is_plain_lines_ending_with_the_summary_figures(corpus, caplog):
    totals = SampleTotals(expand_inputs([str(corpus / "*.tar")]))
    assert totals.wait(60) == 9
    stream = io.StringIO()  # not a terminal: no bar, no carriage returns
    progress = Progress(totals, enabled=True, interval_s=0.0, stream=stream)
    with caplog.at_level(logging.INFO, logger="pipeline.embed.progress"):
        progress.update(4)
        progress.close(8, 1)  # the final figures win over the polled ones
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("embed: 4/9 images (44%)") and "images/s" in lines[0] and "ETA" in lines[0]
    assert lines[-1].startswith("embed: 8/9 images (89%)") and lines[-1].endswith("1 errors")
    assert stream.getvalue() == ""
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()  # a person's terminal: a bar of images against the total, ending on the final figures
    bar = Progress(totals, enabled=True, stream=terminal)
    time.sleep(0.2)  # tqdm redraws at most every 0.1 s (the run polls every second)
    bar.update(4)
    bar.close(9)
    frames = terminal.getvalue().strip().split("\r")
    assert any("4/9" in f for f in frames)
    assert "100%" in frames[-1] and "9/9" in frames[-1] and "img/s" in frames[-1]
    silent = Progress(totals, enabled=False, stream=stream)
    silent.update(3)
    silent.close(9)
    assert stream.getvalue() == ""


# ------------------------------------------------------------------------------------ surprising defaults


def test_random_weights_are_said_first_and_recorded():
    random_cfg = EmbedConfig(inputs=["x.tar"], output="/tmp/icar-unused-run", spec=ModelSpec(model="ViT-B-32"))
    warned = validate.check_embed(random_cfg)
    assert any("random weights" in w and "carry no meaning" in w and "no --pretrained" in w for w in warned)
    none_cfg = EmbedConfig(inputs=["x.tar"], output="/tmp/icar-unused-run",
                           spec=ModelSpec(model="ViT-B-32", pretrained="none"))
    assert any("--pretrained none" in w for w in validate.check_embed(none_cfg))
    assert not validate.check_embed(EmbedConfig(inputs=["x.tar"], output="/tmp/icar-unused-run"))  # the demo
    assert run_json_notes({"model": {"name": "ViT-B-32", "pretrained": "none", "seed": 0},
                           "router": {"kind": "fixed", "depth": 12}}) == {"random_weights": True,
                                                                           "routes_by_score": False}
    assert run_json_notes({"model": {"name": "demo", "pretrained": "shipped"},
                           "router": {"kind": "threshold"}}) == {"random_weights": False, "routes_by_score": True}
    line = EmbedSummary(run="r", images=3, gflops=3.3, full_depth_gflops=3.0, random_weights=True,
                        scored_not_routed=True).line()
    assert "scored but not routed: 10.0% more than full depth, for calibration" in line
    assert line.endswith("; random weights: embeddings carry no meaning")
    assert "(10.0% below full depth)" in EmbedSummary(run="r", images=3, gflops=2.7, full_depth_gflops=3.0).line()
    plain = EmbedSummary(run="r", images=3, gflops=3.3, full_depth_gflops=3.0).line()
    assert "(10.0% more than full depth)" in plain and "-10.0%" not in plain and "random" not in plain


def test_driver_says_random_weights_on_its_first_line(tmp_path, capsys, monkeypatch, caplog):
    import pipeline.embed.execution as execution

    def stop(cfg):  # the run itself is not what this test is about: stop where Ray would start
        raise KeyboardInterrupt

    monkeypatch.setattr(execution, "run_embed", stop)
    (tmp_path / "in").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "in" / "a.jpg")
    with caplog.at_level(logging.WARNING, logger="icar.embed"):
        code = embed_job.main([str(tmp_path / "in"), "--output", str(tmp_path / "run"), "--model", "ViT-B-32"])
    assert code == 130
    assert caplog.records[0].getMessage().startswith("random weights: ViT-B-32 with no --pretrained given")


def test_report_says_random_weights_and_scored_but_not_routed(piped_run, tmp_path):
    out, _, _ = piped_run
    run = tmp_path / "random"
    shutil.copytree(out, run)
    info = json.loads((run / "run.json").read_text())
    assert "scored but not routed" not in summary_line(build_report([str(run)], ReportConfig()))
    # The same rows as if a random init had made them and its router had routed none by the score.
    info["model"]["pretrained"] = "none"
    info["routes_by_score"] = False
    (run / "run.json").write_text(json.dumps(info))
    report = build_report([str(run)], ReportConfig())
    line = summary_line(report)
    assert line.endswith("; random weights: embeddings carry no meaning")
    assert "random weights: embeddings carry no meaning" in render_text(report).splitlines()[2]
    if report["totals"]["gflops"]["saved_pct"] < 0:
        assert "scored but not routed:" in line and "for calibration" in line


def test_exit_at_without_a_trained_head_is_refused_or_said():
    # The demo ships heads for exits 4 and 6 of its 8 blocks: an exit they were not trained for is refused.
    with pytest.raises(validate.ArgumentProblem, match=r"--exit-at 5: the demo's shipped exit heads were trained "
                                                       r"for exits 4, 6 \(and full depth 8\)"):
        validate.check_embed(EmbedConfig(inputs=["x"], output="/tmp/icar-unused-run", spec=ModelSpec(exit_at=5)))
    demo_at_6 = EmbedConfig(inputs=["x"], output="/tmp/icar-unused-run", spec=ModelSpec(exit_at=6))
    assert validate.check_embed(demo_at_6) == []
    # No heads: an exit outside the defaults is added with an untrained head, and the driver says so.
    warned = validate.check_embed(EmbedConfig(inputs=["x"], output="/tmp/icar-unused-run",
                                              spec=ModelSpec(model="ViT-B-32", pretrained="none", exit_at=7)))
    assert any("--exit-at 7 is not one of the default exits 6, 9, 12" in w and "ln_post/proj" in w for w in warned)
    warned = validate.check_embed(EmbedConfig(inputs=["x"], output="/tmp/icar-unused-run",
                                              spec=ModelSpec(model="ViT-B-32", pretrained="none", exit_at=9)))
    assert not any("--exit-at" in w for w in warned)


def test_predicted_image_size_is_the_models():
    from pipeline.model.models import load_clip

    assert validate.image_size(ModelSpec()) == load_clip("demo").image_size
    assert validate.image_size(ModelSpec(model="ViT-B-32")) == 224
    assert validate.image_size(ModelSpec(model="ViT-L-14-336")) == 336


def test_scorer_gflops_are_counted_once_across_runs(tmp_path, monkeypatch):
    """The trained scorer's GFLOP count is cached by checkpoint and input size, like the towers' profiles."""
    from pipeline.model import flops, scorer

    monkeypatch.setenv("ICAR_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(flops, "_memory", {})  # a scorer counted by an earlier test in this process is not written
    counted = scorer.load_scorer("default")
    assert counted.kind == "convnext"  # the shipped checkpoint: the FlopCounterMode pass worth caching
    entry = json.loads((tmp_path / "flops.json").read_text())
    key = f"v{flops.CACHE_VERSION}|scorer|{counted.identity['sha256']}|{counted.input_size}"
    assert entry[key]["gflops"] == pytest.approx(counted.gflops_per_image) and counted.gflops_per_image > 0
    # A figure another process wrote is read back, not counted again.
    entry["v%d|scorer|other|99" % flops.CACHE_VERSION] = {"gflops": 1.25}
    (tmp_path / "flops.json").write_text(json.dumps(entry))
    assert flops.cached_gflops("scorer|other|99", lambda: pytest.fail("counted again")) == 1.25
    assert flops.cached_gflops("scorer|new|1", lambda: 2.5) == 2.5
    assert json.loads((tmp_path / "flops.json").read_text())[f"v{flops.CACHE_VERSION}|scorer|new|1"]["gflops"] == 2.5
