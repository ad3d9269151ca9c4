"""One CLI grammar: every `icar <job> --help` renders, the shared groups appear where a job uses them, renamed
flags keep their old spellings as warned aliases, and `icar embed --merge SCHEDULE` runs one merged profile."""

from __future__ import annotations

import importlib
import os
import re

import numpy as np
import pytest

from jobs import common, embed, index
from pipeline import cli
from pipeline.embed.validate import ArgumentProblem, check_scorer_and_router
from pipeline.model import flops
from pipeline.model.spec import ModelSpec, Profile, parse_merge
from pipeline.model.worker import ModelWorker

LOGGING = {"--no-progress", "--log-format"}
# Which job has which shared flag beyond the logging group (every job has that one).
SHARED = {
    "--device": {"embed", "index", "search", "calibrate", "train-exits", "train-complexity", "eval-complexity",
                 "train-scorer", "reindex", "train-confidence"},
    "--threads": {"embed", "index", "search", "calibrate", "train-exits", "train-complexity", "eval-complexity",
                  "train-scorer", "train-demo", "reindex", "train-confidence"},
    "--address": {"embed", "index", "reindex"},
    "--storage-options": {"embed", "index", "search", "report", "calibrate", "train-exits", "train-confidence"},
    "--model": {"embed", "calibrate", "train-exits", "train-confidence"},
    "--pretrained": {"embed", "calibrate", "train-exits", "train-confidence"},
    "--exits": {"embed", "calibrate", "train-exits", "train-confidence"},
    "--heads": {"embed", "calibrate", "train-confidence"},
    "--precision": {"embed"},
}


def job_help(name: str, capsys, monkeypatch) -> str:
    """Return `icar NAME --help` as printed, asserting it exits 0."""
    # Leave the test session's logging as it is (`icar` and `icar demo` set logging up before parsing).
    for module in (cli, importlib.import_module(cli.JOBS[name][0])):
        monkeypatch.setattr(module, "setup_logging", lambda: None, raising=False)
    with pytest.raises(SystemExit) as e:
        cli.main([name, "--help"])
    assert e.value.code == 0, name
    return capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(cli.JOBS))
def test_every_job_help_renders_with_the_shared_flags(name, capsys, monkeypatch):
    text = job_help(name, capsys, monkeypatch)
    assert f"icar {name}" in text
    assert "(default: None)" not in text and "(default: False)" not in text
    options = set(re.findall(r"^\s+(--[a-z-]+)", text, re.M))  # the option lines, not the prose around them
    for flag in LOGGING:
        assert flag in options, f"icar {name} lacks {flag}"
    for flag, jobs in SHARED.items():
        assert (flag in options) == (name in jobs), \
            f"icar {name}: {flag} {'missing' if name in jobs else 'unexpected'}"
    if "--device" in options:
        assert "{auto,cpu,cuda,cuda:N}" in text and "(default: auto," in text
    hidden = {"--torch-threads"} | ({"--workers", "--merge"} if name == "index" else set())
    assert not options & hidden, f"icar {name} shows deprecated {options & hidden}"


def test_help_shows_a_default_once_and_only_when_it_says_something():
    p = common.argparse.ArgumentParser(formatter_class=common.HelpFormatter)
    p.add_argument("--a", default=None, help="unset")
    p.add_argument("--b", default=0, help="zero is a value")
    p.add_argument("--c", default=3, help="explained (default: three)")
    p.add_argument("--d", action="store_true", help="switch")
    text = " ".join(p.format_help().split())
    assert "unset --b" in text and "zero is a value (default: 0)" in text
    assert "explained (default: three) --d" in text and "(default: False)" not in text


@pytest.mark.parametrize("value", ["auto", "cpu", "cuda", "cuda:1", "CUDA:0"])
def test_device_accepts_auto_cpu_cuda_and_cuda_n(value):
    assert common.device(value) == value.lower()


@pytest.mark.parametrize("job", ["embed", "index", "search", "eval-complexity", "train-exits"])
@pytest.mark.parametrize("value", ["gpu", "cuda:", "cuda:x", "mps"])
def test_device_refuses_anything_else_with_exit_2(job, value, capsys):
    module = importlib.import_module(cli.JOBS[job][0])
    with pytest.raises(SystemExit) as e:
        module.build_parser().parse_args(["x", "--output", "o", "--images", "i", "--labels", "l", "--device", value]
                                         if job == "eval-complexity" else ["x", "--output", "o", "--device", value])
    assert e.value.code == 2
    assert "use auto, cpu, cuda or cuda:N" in capsys.readouterr().err


def test_renamed_index_flags_keep_their_old_spelling_with_a_warning(capsys):
    p = index.build_parser()
    new = p.parse_args(["run", "--output", "o", "--merge-partials", "disk", "--add-tasks", "3"])
    assert capsys.readouterr().err == ""
    old = p.parse_args(["run", "--output", "o", "--merge", "disk", "--workers", "3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert (old.merge, old.workers) == (new.merge, new.workers) == ("disk", 3)
    assert err == ["icar index: warning: --merge is deprecated, use --merge-partials",
                   "icar index: warning: --workers is deprecated, use --add-tasks"]
    cfg = index.config_from_args(p.parse_args(["run", "--output", "o"]))
    assert (cfg.merge, cfg.workers) == ("auto", None)  # the defaults are the config's, alias or not


def test_embed_torch_threads_is_threads(capsys):
    p = embed.build_parser()
    assert p.parse_args(["x", "-o", "r", "--threads", "2"]).torch_threads == 2
    assert p.parse_args(["x", "-o", "r", "--torch-threads", "3"]).torch_threads == 3
    assert "--torch-threads is deprecated, use --threads" in capsys.readouterr().err
    assert p.parse_args(["x", "-o", "r"]).torch_threads is None


def test_log_format_sets_what_setup_logging_reads(monkeypatch):
    monkeypatch.delenv("ICAR_LOG_FORMAT", raising=False)
    calls = []
    monkeypatch.setattr(common, "setup_logging", lambda: calls.append(os.environ.get("ICAR_LOG_FORMAT")))
    common.apply_logging(index.build_parser().parse_args(["run", "--output", "o"]))
    assert calls == [] and "ICAR_LOG_FORMAT" not in os.environ  # no flag: logging stays as the caller set it up
    common.apply_logging(index.build_parser().parse_args(["run", "--output", "o", "--log-format", "json"]))
    assert calls == ["json"] and os.environ["ICAR_LOG_FORMAT"] == "json"


# ----------------------------------------------------------------------------------------- icar embed --merge

@pytest.mark.parametrize("argv, says", [
    (["--merge", "bogus"], "merge schedule 'bogus' is not understood"),
    (["--merge", "r2", "--router", "router.json"], "--merge applies one schedule to every image"),
    (["--merge", "keep0.8", "--route-fractions", "0.5,0.5"], "--merge applies one schedule to every image"),
])
def test_embed_merge_refuses_an_unknown_schedule_or_a_router(argv, says, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        embed.main([str(tmp_path / "in"), "--output", str(tmp_path / "run"), *argv])
    assert e.value.code == 2 and says in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_embed_merge_reaches_the_spec():
    a = embed.build_parser().parse_args(["x", "-o", "r", "--merge", "KEEP0.80", "--exit-at", "6"])
    spec = embed.config_from_args(a).spec
    assert (spec.merge, spec.exit_at) == ("keep0.8", 6)
    assert embed.config_from_args(embed.build_parser().parse_args(["x", "-o", "r", "--merge", "none"])).spec.merge is None


@pytest.mark.parametrize("exit_at", [None, 6])
def test_merge_runs_every_image_at_the_schedules_counted_profile(exit_at, tmp_path, monkeypatch):
    monkeypatch.setenv("ICAR_CACHE_DIR", str(tmp_path / "cache"))
    w = ModelWorker(ModelSpec(model="demo", device="cpu", torch_threads=1, merge="r2", exit_at=exit_at))
    depth = exit_at or w.exits[-1]
    desc = w.describe()
    assert desc["router"]["kind"] == "profile" and desc["router"]["profiles"] == [f"{depth}@r2"]
    assert [(p["profile"], p["merge"]) for p in desc["profiles"]] == [(f"{depth}@r2", "r2")]
    counted = flops.profile_cost(w.bundle, Profile(depth, parse_merge("r2")))
    assert desc["profiles"][0]["gflops"] == pytest.approx(counted)
    assert counted < w.gflops_per_exit[depth]  # merging saves compute at that depth
    pixels = np.random.default_rng(0).integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
    out = w.embed(pixels, [f"k{i}" for i in range(5)])
    assert out["exit_layer"].tolist() == [depth] * 5
    np.testing.assert_allclose(out["gflops"], np.float32(counted) + np.float32(w.scorer_gflops), rtol=1e-6)
    with pytest.raises(ValueError, match="--merge applies one schedule"):
        ModelWorker(ModelSpec(model="demo", device="cpu", torch_threads=1, merge="r2", route_fractions=[0.5, 0.5]))


def test_merge_needs_no_scorer_because_the_demo_router_is_not_used():
    check_scorer_and_router(ModelSpec(model="demo", merge="r2", scorer="none"), 8)  # merging alone: no scores
    with pytest.raises(ArgumentProblem, match="routes by complexity score"):
        check_scorer_and_router(ModelSpec(model="demo", scorer="none"), 8)  # the shipped router needs them


def test_reindex_device_and_threads_override_the_config_only_when_given(tmp_path, monkeypatch):
    """`icar reindex --device/--threads` speak the shared grammar but the config file keeps the default."""
    import yaml

    from jobs import reindex as reindex_job

    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "inputs": [str(tmp_path / "*.tar")], "root": str(tmp_path / "root"),
                                    "model": {"name": "demo", "device": "cpu", "torch_threads": 1}}))
    seen = []

    class Result:
        exit_code, record = 0, {}

        def line(self):
            return "ok"

    monkeypatch.setattr(reindex_job, "run_reindex", lambda cfg, break_lock=False: seen.append(cfg.model) or Result())
    assert reindex_job.main(["--config", str(path)]) == 0
    assert reindex_job.main(["--config", str(path), "--device", "cuda:1", "--threads", "3"]) == 0
    assert (seen[0].device, seen[0].torch_threads) == ("cpu", 1)
    assert (seen[1].device, seen[1].torch_threads) == ("cuda:1", 3)
