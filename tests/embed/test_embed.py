"""End-to-end `icar embed` on a real local Ray with real image files: run directory contract, errors, resume, S3."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.embed.config import EmbedConfig
from pipeline.model.spec import ModelSpec
from pipeline.io.schema import ERROR_SCHEMA, MANIFEST_SCHEMA, shard_schema
from pipeline.runtime import resolve_precision

# The shipped demo CLIP (64 px, 0.06 GFLOPs an image): these tests are about the pipeline, not the model; the
# open_clip names (ViT-B-32, ViT-L-14) are covered by test_encoder, test_flops and the reliability tests.
MODEL = dict(model="demo")
REPO = Path(__file__).resolve().parents[2]


def jpeg(rng: np.random.Generator, w: int, h: int, fmt: str = "JPEG") -> bytes:
    """Return a real encoded image: smooth gradient plus a few rectangles and noise."""
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * 255 / max(w, 1)), (yy * 255 / max(h, 1)), np.full((h, w), rng.integers(0, 255))], -1)
    img = base + rng.normal(0, 10, base.shape)
    for _ in range(rng.integers(0, 6)):
        x0, y0 = rng.integers(0, w // 2), rng.integers(0, h // 2)
        img[y0:y0 + h // 4, x0:x0 + w // 4] = rng.integers(0, 255, 3)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, fmt)
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes, str | None]], ext: str = "jpg") -> None:
    """Write an img2dataset-style WebDataset shard: KEY.jpg, KEY.txt, KEY.json."""
    with tarfile.open(path, "w") as tar:
        for key, data, caption in members:
            files = [(f"{key}.{ext}", data)]
            if caption is not None:
                files.append((f"{key}.txt", caption.encode()))
            files.append((f"{key}.json", json.dumps({"url": f"http://example.com/{key}.jpg", "key": key}).encode()))
            for name, payload in files:
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Three good tar shards (one with broken members) and a Parquet shard of real images."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    for s in range(3):
        members = [(f"{s:05d}{i:04d}", jpeg(rng, 160 + 7 * i, 120 + 3 * i), f"image {i} of shard {s}")
                   for i in range(10)]
        if s == 1:
            members.append((f"{s:05d}9998", b"<html><body>not an image</body></html>", "broken"))
            members.append((f"{s:05d}9999", b"", None))
        write_tar(root / f"{s:05d}.tar", members)
    import pyarrow as pa

    table = pa.table({"key": [f"pq{i}" for i in range(6)], "jpg": [jpeg(rng, 100, 80, "PNG") for _ in range(6)],
                      "caption": [f"parquet image {i}" for i in range(6)]})
    pq.write_table(table, root / "extra.parquet")
    return root


def spec(**kw) -> ModelSpec:
    return ModelSpec(**{**MODEL, "scorer": "heuristic", **kw})


def embed(inputs, output, **kw):
    from pipeline.embed.execution import run_embed

    model_kw = {k: kw.pop(k) for k in list(kw) if k in ModelSpec.__dataclass_fields__}
    cfg = EmbedConfig(inputs=[str(i) for i in inputs], output=str(output), spec=spec(**model_kw),
                      batch_size=kw.pop("batch_size", 4), progress=False, **kw)
    return run_embed(cfg)


def read_run(run: Path):
    manifest = pq.read_table(run / "manifest.parquet")
    tables = [pq.read_table(run / out) for out in manifest.column("output").to_pylist()]
    import pyarrow as pa

    return manifest, pa.concat_tables(tables)


@pytest.fixture(scope="module")
def full_run(corpus, tmp_path_factory, ray_session):
    out = tmp_path_factory.mktemp("runs") / "full"
    summary = embed([corpus / "*.tar", corpus / "extra.parquet"], out, full_depth=True)
    return out, summary


def test_run_directory_contract(full_run, corpus):
    out, summary = full_run
    assert summary.exit_code == 0
    assert summary.images == 36 and summary.errors == 2 and summary.shards_committed == 4
    manifest, table = read_run(out)
    assert manifest.schema.equals(MANIFEST_SCHEMA)
    run = json.loads((out / "run.json").read_text())
    dim = run["embed_dim"]
    assert table.schema.equals(shard_schema(dim))
    assert table.num_rows == 36 and len(set(table.column("key").to_pylist())) == 36
    assert set(table.column("exit_layer").to_pylist()) == {run["exits"][-1]}
    emb = np.stack(table.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=2e-3)
    gflops = table.column("gflops").to_numpy()
    expected = run["gflops_per_exit"][str(run["exits"][-1])] + run["scorer_gflops"]
    np.testing.assert_allclose(gflops, expected, rtol=1e-5)
    assert abs(sum(manifest.column("gflops").to_pylist()) - gflops.sum()) < 1e-2
    # Widths come from the decoded image, captions and urls from the .txt/.json members.
    row = table.filter(pc.equal(table.column("key"), "000000003")).to_pylist()[0]
    assert (row["width"], row["height"]) == (160 + 21, 120 + 9)
    assert row["caption"] == "image 3 of shard 0" and row["url"] == "http://example.com/000000003.jpg"
    errors = pq.read_table(out / "errors" / "part-00001.parquet")
    assert errors.schema.equals(ERROR_SCHEMA)
    assert sorted(errors.column("key").to_pylist()) == ["000019998", "000019999"]
    assert set(errors.column("stage").to_pylist()) == {"decode"}
    assert not (out / "errors" / "part-00000.parquet").exists()
    assert run["model"]["name"] == "demo" and "weights_sha256" in run["model"]
    # The precision the model computed in (auto: bf16 on CPUs with native bf16, else fp32), beside what was asked.
    assert run["spec"]["precision"] == "auto" and run["device"] == "cpu"
    assert run["precision"] == resolve_precision("auto", "cpu").precision and run["precision_reason"]
    assert not list(out.rglob("*.tmp-*"))


def test_full_depth_equals_encode_image(full_run, corpus):
    """The full-depth rows are what open_clip's own encode_image gives for the same preprocessed image, at the
    precision the run computed in (run.json's: bf16 where the CPU has it natively, else fp32)."""
    import torch

    from pipeline.io.decode import DecodeConfig, decode_image
    from pipeline.model.models import load_clip, pixels_to_tensor

    out, _ = full_run
    _, table = read_run(out)
    bundle = load_clip("demo", precision=json.loads((out / "run.json").read_text())["precision"])
    with tarfile.open(corpus / "00002.tar") as tar:
        data = tar.extractfile("000020005.jpg").read()
    pixels = decode_image(data, DecodeConfig(image_size=bundle.image_size)).pixels
    with torch.no_grad():
        ref = bundle.model.encode_image(pixels_to_tensor(bundle, pixels[None], dtype=bundle.dtype))
    ref = torch.nn.functional.normalize(ref.float(), dim=-1)[0].numpy()
    row = table.filter(pc.equal(table.column("key"), "000020005")).column("embedding").to_pylist()[0]
    np.testing.assert_allclose(np.asarray(row, np.float32), ref, atol=2e-3)


def test_rerun_skips_committed_shards(full_run, corpus):
    out, _ = full_run
    before = (out / "manifest.parquet").stat().st_mtime_ns
    summary = embed([corpus / "*.tar", corpus / "extra.parquet"], out, full_depth=True)
    assert summary.shards_skipped == 4 and summary.shards_committed == 0 and summary.images == 0
    assert (out / "manifest.parquet").stat().st_mtime_ns == before


def test_other_model_into_same_run_is_refused(full_run, corpus):
    from pipeline.io.shards import RunStateError

    out, _ = full_run
    with pytest.raises(RunStateError, match="different"):
        embed([corpus / "*.tar"], out, full_depth=False, exit_at=6)


def test_bad_shard_is_reported_and_the_rest_committed(corpus, tmp_path, ray_session):
    shard = (corpus / "00000.tar").read_bytes()
    bad = tmp_path / "in"
    bad.mkdir()
    (bad / "a.tar").write_bytes(shard)
    (bad / "b.tar").write_bytes(shard[: len(shard) // 2 + 100])  # cut mid-member
    summary = embed([bad / "*.tar"], tmp_path / "run", full_depth=True, shard_retries=1)
    assert summary.exit_code == 1
    assert [s for s, _ in summary.shards_failed] == [str(bad / "b.tar")]
    manifest, table = read_run(tmp_path / "run")
    assert manifest.column("source").to_pylist() == [str(bad / "a.tar")]
    failure = pq.read_table(tmp_path / "run" / "errors" / "part-00001.parquet").to_pylist()
    assert failure[0]["stage"] == "shard" and failure[0]["key"] is None and "b.tar" in failure[0]["source"]


def test_cli_help_and_bad_input(tmp_path):
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "embed", "--help"], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0 and "--route-fractions" in out.stdout and "examples:" in out.stdout
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "embed", str(tmp_path / "nothing-*.tar"),
                          "--output", str(tmp_path / "run")], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2 and "nothing-*.tar" in out.stderr


def test_killed_run_resumes_to_the_same_result(corpus, full_run, tmp_path, ray_session):
    """SIGKILL the driver after its first commit; the re-run gives the keys and embeddings of an unbroken run."""
    inputs = [str(corpus / "*.tar"), str(corpus / "extra.parquet")]
    out = tmp_path / "killed"
    address = ray_session.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "jobs.embed", *inputs, "--output", str(out), "--model", "demo",
           "--scorer", "heuristic", "--full-depth", "--batch-size", "4",
           "--address", address, "--decode-tasks", "1", "--no-progress"]
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    while not (out / "manifest.parquet").exists():
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no shard committed in time"
        time.sleep(0.01)  # the demo model is fast: kill right after the first commit, before the last
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    committed = pq.read_table(out / "manifest.parquet").num_rows
    assert 1 <= committed < 4
    assert not list(out.rglob("*.tmp-*")) or all(p.name.startswith(".") for p in out.rglob("*.tmp-*"))
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    _, resumed = read_run(out)
    _, reference = read_run(full_run[0])
    assert sorted(resumed.column("key").to_pylist()) == sorted(reference.column("key").to_pylist())
    by_key = lambda t: dict(zip(t.column("key").to_pylist(), t.column("embedding").to_pylist()))
    a, b = by_key(resumed), by_key(reference)
    assert all(a[k] == b[k] for k in a)


def test_s3_input_and_output(corpus, s3_bucket, ray_session):
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.put(str(corpus / "00000.tar"), f"{s3_bucket}/in/00000.tar")
    fs.put(str(corpus / "00002.tar"), f"{s3_bucket}/in/00002.tar")
    run = f"s3://{s3_bucket}/runs/r1"
    summary = embed([f"s3://{s3_bucket}/in/*.tar"], run, full_depth=True)
    assert summary.exit_code == 0 and summary.images == 20
    fs.invalidate_cache()
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.find(f"{s3_bucket}/runs/r1"))
    assert names == ["manifest.parquet", "part-00000.parquet", "part-00001.parquet", "run.json"]
    with fs.open(f"{s3_bucket}/runs/r1/run.json") as f:
        text = f.read().decode()
    assert "testing-secret-key" not in text and "testing-key-id" not in text
    with fs.open(f"{s3_bucket}/runs/r1/manifest.parquet") as f:
        manifest = pq.read_table(f)
    assert manifest.column("source").to_pylist() == [f"s3://{s3_bucket}/in/00000.tar", f"s3://{s3_bucket}/in/00002.tar"]
    assert all(manifest.column("source_etag").to_pylist())


def test_folder_with_bad_name_and_outside_symlink_embeds_the_rest(tmp_path, ray_session):
    """A folder with a non-UTF-8 file name and a link to a file outside it (issue 18): the good images and the
    bad name (as an escaped key) are embedded, the link is an error row, and no byte of its target is written."""
    rng = np.random.default_rng(7)
    secret = b"TOP-SECRET-" * 64
    (tmp_path / "secret.jpg").write_bytes(secret)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.jpg").write_bytes(jpeg(rng, 80, 60))
    with open(os.path.join(os.fsencode(folder), b"caf\xe9.jpg"), "wb") as f:
        f.write(jpeg(rng, 80, 60))
    (folder / "x.jpg").symlink_to(tmp_path / "secret.jpg")
    out = tmp_path / "run"
    summary = embed([folder], out, full_depth=True, folder_shard_size=2)
    assert summary.exit_code == 0 and summary.shards_committed == 3 and (summary.images, summary.errors) == (4, 1)
    manifest, table = read_run(out)
    assert manifest.column("source").to_pylist() == [f"{folder}#{a:07d}-{a + 1:07d}" for a in (0, 2, 4)]
    assert sorted(table.column("key").to_pylist()) == ["0", "1", "2", "caf%E9"]  # keys drop the extension, as in tars
    errors = pq.read_table(out / "errors").to_pylist()
    assert [(e["key"], e["stage"]) for e in errors] == [("x", "read")]
    assert errors[0]["error"].startswith("x.jpg: ")  # the message names the file
    assert "symlink outside the input" in errors[0]["error"]
    assert not [p for p in out.rglob("*") if p.is_file() and b"TOP-SECRET" in p.read_bytes()]
    again = embed([folder], out, full_depth=True, folder_shard_size=2)  # the same shards: all skipped
    assert (again.shards_skipped, again.shards_committed) == (3, 0)
