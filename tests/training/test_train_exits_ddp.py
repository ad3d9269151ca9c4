"""icar train-exits data-parallel (torch DDP over gloo, 2 CPU processes): the result of one process at the same
global batch, in both recipes; only rank 0 writes; a run interrupted in 1 process resumes with 2 (--workers)."""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from jobs import train_exits as job
from pipeline.demo import corpus as dc
from pipeline.training import distributed
from pipeline.training import exits as et
from pipeline.training.exit_step import clip_loss_share
from pipeline.model import models
from pipeline.io import storage
from preempt import preempt_after_first_epoch

TRAIN_PAIRS = 37  # 16 + 16 + 5 at batch 16: the last global batch splits 3 / 2 over two processes


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Demo-corpus shards for the demo model (64 px): 40 train, 20 val, and first a shard with bad samples."""
    root = tmp_path_factory.mktemp("ddp-corpus")
    dc.make_demo_corpus(dc.DemoCorpusConfig(output=str(root), n=60, val=20, test=0, shard_size=20, image_size=64,
                                            complexity_train=0, progress=False))
    good = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), (200, 30, 30), np.uint8)).save(good, format="PNG")
    members = [("x0.png", good.getvalue()), ("x0.txt", b"a red square"),
               ("x1.png", b"not an image"), ("x1.txt", b"broken bytes"),  # fails to decode (in one process)
               ("x2.png", good.getvalue())]  # no caption
    (root / "extra").mkdir()
    with tarfile.open(root / "extra" / "00000.tar", "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return root


def _cfg(corpus, out, **kw) -> et.ExitTrainConfig:
    base = dict(inputs=[str(corpus / "extra" / "00000.tar"), str(corpus / "train" / "*.tar")],
                val_inputs=[str(corpus / "val" / "*.tar")],
                output=str(out), model="demo", epochs=2, batch_size=16, lr=1e-3, device="cpu",
                extract_batch_size=16, max_train=TRAIN_PAIRS)
    base.update(kw)
    return et.ExitTrainConfig(**base)


def _rank_worker(cfgs: list[et.ExitTrainConfig]) -> None:
    """Runs in each spawned process: the runs of ``cfgs`` in one process group; a write by rank 1 fails them."""
    rank = int(os.environ["RANK"])
    if rank != 0:
        def refuse(url, *args, **kwargs):
            raise AssertionError(f"rank {rank} wrote {url}")

        for name in ("atomic_write_bytes", "write_json", "write_parquet", "makedirs"):
            setattr(storage, name, refuse)
    with distributed.process_group("cpu"):  # one group for all runs: starting processes is the slow part
        for cfg in cfgs:
            et.train_exits(cfg)


def _files(root) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs}


def _assert_same_heads(a: str, b: str, atol: float = 2e-5) -> None:
    ta, tb = load_file(a), load_file(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], atol=atol, rtol=1e-4, msg=k)


def _assert_same_history(a: list, b: list) -> None:
    assert len(a) == len(b)
    for ha, hb in zip(a, b):
        assert ha["train_loss"] == pytest.approx(hb["train_loss"], rel=1e-5)
        for e, row in ha["val"].items():
            assert row == pytest.approx(hb["val"][e], abs=1e-5)


def _metrics(out) -> dict:
    return json.loads((out / "metrics.json").read_text())


FINETUNE = dict(epochs=1, finetune_backbone=True, backbone_lr=1e-4, shuffle_buffer=64)


@pytest.fixture(scope="module")
def single(corpus, tmp_path_factory):
    """The one-process runs the data-parallel runs are compared with: frozen and fine-tune recipes."""
    out = tmp_path_factory.mktemp("single")
    et.train_exits(_cfg(corpus, out / "frozen"))
    et.train_exits(_cfg(corpus, out / "finetune", **FINETUNE))
    return out


@pytest.fixture(scope="module")
def two(corpus, tmp_path_factory):
    """The same runs in two processes (torch DDP over gloo), where rank 1 may not write."""
    out = tmp_path_factory.mktemp("two")
    distributed.spawn(_rank_worker, ([_cfg(corpus, out / "frozen"), _cfg(corpus, out / "finetune", **FINETUNE)],),
                      2, "cpu")
    return out


def test_two_processes_train_the_heads_one_process_trains_and_only_rank_0_writes(single, two):
    ref, doc = _metrics(single / "frozen"), _metrics(two / "frozen")
    assert doc["world_size"] == 2 and ref["world_size"] == 1
    # features were extracted half by each process, gathered in stream order
    assert doc["pairs"] == ref["pairs"] == {"train": TRAIN_PAIRS, "val": 20}
    # with --max-train the processes may read past where one process stops: compare what was used
    assert doc["samples"]["val"] == ref["samples"]["val"]
    for count in ("used", "decode_errors", "no_caption"):
        assert doc["samples"]["train"][count] == ref["samples"]["train"][count]
    assert ref["samples"]["train"]["decode_errors"] == 1 and ref["samples"]["train"]["no_caption"] == 1
    _assert_same_history(doc["history"], ref["history"])
    assert ref["history"][-1]["train_loss"]["4"] < ref["history"][0]["train_loss"]["4"]
    _assert_same_heads(str(two / "frozen" / "exit_heads.safetensors"),
                       str(single / "frozen" / "exit_heads.safetensors"))
    assert doc["before"] == ref["before"]
    for e in ("4", "6", "8"):
        assert doc["after"][e]["t2i"] == ref["after"][e]["t2i"]
        assert doc["after"][e]["cos_to_full"] == pytest.approx(ref["after"][e]["cos_to_full"], abs=1e-5)
    assert _files(two / "frozen") == _files(single / "frozen") == {
        "checkpoint.pt", "exit_heads.safetensors", "metrics.json", "features-train.safetensors",
        "features-val.safetensors"}


def test_finetune_backbone_in_two_processes_matches_one(single, two):
    one, two = single / "finetune", two / "finetune"
    a, b = _metrics(one), _metrics(two)
    assert b["world_size"] == 2 and b["pairs"] == a["pairs"] == {"train": TRAIN_PAIRS - 1, "val": 20}
    assert b["samples"] == a["samples"]
    assert b["history"][0]["train_loss"] == pytest.approx(a["history"][0]["train_loss"], rel=1e-5)
    _assert_same_heads(str(two / "exit_heads.safetensors"), str(one / "exit_heads.safetensors"))
    for e in ("4", "6", "8"):
        assert b["after"][e]["cos_to_full"] == pytest.approx(a["after"][e]["cos_to_full"], abs=1e-5)
    # The backbones agree to float rounding, measured against how far training moved them: Adam turns the float
    # noise of gradients that are zero in exact arithmetic (attention key biases) into steps of its own.
    start = load_file(str(models.DEMO_DIR / "clip.safetensors"))
    ta = load_file(str(one / "backbone" / "clip.safetensors"))
    tb = load_file(str(two / "backbone" / "clip.safetensors"))
    moved = torch.cat([(ta[k] - start[k]).flatten() for k in ta]).norm()
    apart = torch.cat([(ta[k] - tb[k]).flatten() for k in ta]).norm()
    assert moved > 0.05 and apart < 2e-3 * moved  # the backbone trained (a new model), the same way in both
    assert _files(two) == _files(one)


def test_a_run_interrupted_in_one_process_resumes_with_two_workers(corpus, single, tmp_path, monkeypatch):
    ref, ref_out = _metrics(single / "frozen"), single / "frozen"
    out = tmp_path / "out"
    preempt_after_first_epoch(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        et.train_exits(_cfg(corpus, out))
    monkeypatch.undo()
    assert (out / "checkpoint.pt").exists() and not (out / "exit_heads.safetensors").exists()

    rc = job.main([str(corpus / "extra" / "00000.tar"), str(corpus / "train" / "*.tar"), "--output", str(out),
                   "--val", str(corpus / "val" / "*.tar"), "--model", "demo", "--epochs", "2", "--batch-size", "16",
                   "--lr", "1e-3", "--device", "cpu", "--extract-batch-size", "16", "--max-train", str(TRAIN_PAIRS),
                   "--workers", "2", "--resume"])
    assert rc == 0
    resumed = _metrics(out)
    assert resumed["world_size"] == 2 and [h["epoch"] for h in resumed["history"]] == [0, 1]
    assert resumed["samples"] == ref["samples"]  # the feature cache of the first run was reused
    _assert_same_history(resumed["history"], ref["history"])
    _assert_same_heads(str(out / "exit_heads.safetensors"), str(ref_out / "exit_heads.safetensors"))


def test_loss_shares_are_open_clips_loss_in_one_process():
    from open_clip.loss import ClipLoss

    g = torch.Generator().manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(7, 5, generator=g), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(7, 5, generator=g), dim=-1)
    scale = torch.tensor(20.0)
    got = clip_loss_share(distributed.Dist(), image, text, text, scale, [7])
    torch.testing.assert_close(got, ClipLoss()(image, text, scale))
    assert distributed.split_sizes(5, 2) == [3, 2] and distributed.split_sizes(1, 3) == [1, 0, 0]


def test_workers_are_refused_when_they_cannot_run(tmp_path, monkeypatch):
    assert job.main(["x.tar", "--output", str(tmp_path / "o"), "--workers", "0"]) == 2
    monkeypatch.setenv("WORLD_SIZE", "4")  # as under torchrun with 4 processes
    with pytest.raises(et.TrainExitsError, match="not both"):
        et.train_exits(et.ExitTrainConfig(inputs=["x.tar"], output=str(tmp_path / "o"), workers=2))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(et.TrainExitsError, match="torchrun"):
        et.train_exits(et.ExitTrainConfig(inputs=["x.tar"], output=str(tmp_path / "o")))
