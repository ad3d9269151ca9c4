"""JPEG decoding on the model's device (``icar embed --decode-device cuda``), exercised on CPU: torchvision's
decode_jpeg runs on CPU too, so the byte-shipping path, the per-sample CPU fallback and the error rows are the
same code the GPU runs (bench/gpu_check.py exercises the CUDA branch itself)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline.embed.config import EmbedConfig
from pipeline.embed.execution import ModelActor, ModelFacts, process_shard
from pipeline.io.decode import DecodeConfig, EncodedBatch, decode_image, probe_jpeg
from pipeline.io.readers import expand_inputs
from pipeline.model.device_decode import decode_batch, orient
from pipeline.model.spec import ModelSpec
from pipeline.model.worker import ModelWorker
from zoo import ShardSample, encode, make_corpus, make_photo_like, tar_bytes, zoo_cases

pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")

# Measured tolerance of device decoding on CPU (libjpeg) against the CPU path, for JPEGs below its draft mode:
# within 2 grey levels (float32 resize vs PIL's fixed point), up to 6 at sharp edges of the few sizes for which
# Pillow 13 runs its vertical pass first (the device path always goes horizontal first); mean far below 0.1.
# docs/benchmarks/gpu-check.md.
PIXEL_TOLERANCE = 8


def jpeg_with_orientation(orientation: int, w: int = 96, h: int = 60) -> bytes:
    """Return a photo-like JPEG whose EXIF block asks for ``orientation``."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    make_photo_like(np.random.default_rng(orientation), w, h).save(buf, "JPEG", quality=95, exif=exif)
    return buf.getvalue()


def encoded(datas: list[bytes], cfg: DecodeConfig) -> EncodedBatch:
    """Return the batch a shard task ships for ``datas``: probed JPEGs as bytes, the rest decoded to pixels."""
    headers = [probe_jpeg(d, cfg) for d in datas]
    jpeg_at = [i for i, h in enumerate(headers) if h is not None]
    pixels_at = [i for i, h in enumerate(headers) if h is None]
    pixels = [decode_image(datas[i], cfg).pixels for i in pixels_at]
    return EncodedBatch(size=len(datas), max_pixels=cfg.max_pixels, jpeg_at=jpeg_at,
                        jpegs=[datas[i] for i in jpeg_at], headers=[headers[i] for i in jpeg_at],
                        pixels_at=pixels_at,
                        pixels=np.stack(pixels) if pixels else np.zeros((0, cfg.image_size, cfg.image_size, 3),
                                                                        np.uint8))


def test_probe_takes_plain_jpegs_and_leaves_the_rest_to_the_cpu_path():
    cases = zoo_cases()
    cfg = DecodeConfig(image_size=64)
    shipped = {name for name, case in cases.items() if probe_jpeg(case.data, cfg) is not None}
    assert {"jpeg_ok", "jpeg_progressive", "jpeg_grayscale", "jpeg_exif_rotated", "jpeg_truncated"} <= shipped
    assert not shipped & {"jpeg_cmyk", "png_ok", "webp_ok", "html_as_jpg", "random_bytes", "zero_bytes"}
    for name in shipped:  # the header's size is what the CPU path reports (EXIF orientation applied)
        if cases[name].embeds:
            assert (probe_jpeg(cases[name].data, cfg).width, probe_jpeg(cases[name].data, cfg).height) \
                == cases[name].size, name
    banner = encode(make_photo_like(np.random.default_rng(0), 2000, 20), "jpg")
    assert probe_jpeg(banner, cfg) is None  # resampled crop-first by the CPU path only
    assert probe_jpeg(cases["jpeg_ok"].data, DecodeConfig(image_size=64, max_pixels=100)) is None
    assert probe_jpeg(cases["jpeg_ok"].data, DecodeConfig(image_size=64, formats=("PNG",))) is None


@pytest.mark.parametrize("size", [64, 224])
def test_device_pixels_match_the_cpu_path_within_the_tolerance(size):
    rng = np.random.default_rng(1)
    # Below the CPU path's JPEG draft mode (short side >= 4 S), whose own departure is documented apart.
    datas = [s.image for s in make_corpus(rng, 12, exts=("jpg",), min_side=40, max_side=255)]
    datas += [jpeg_with_orientation(o) for o in range(1, 9)]
    cfg = DecodeConfig(image_size=size)
    out = decode_batch(encoded(datas, cfg), size, "cpu")
    assert out.index == list(range(len(datas))) and out.errors == [] and out.fallbacks == 0
    reference = np.stack([decode_image(d, cfg).pixels for d in datas])
    diff = np.abs(out.pixels.numpy().astype(int) - reference)
    assert diff.max() <= PIXEL_TOLERANCE, diff.reshape(len(datas), -1).max(1)
    assert diff.mean() < 0.05


def test_orientation_turns_like_pil():
    image = torch.arange(2 * 3 * 5, dtype=torch.uint8).view(2, 3, 5).repeat(3, 1, 1)[:3]
    pil = Image.fromarray(image.permute(1, 2, 0).numpy())
    ops = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
           5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
           8: Image.Transpose.ROTATE_90}
    for orientation, op in ops.items():
        want = np.asarray(pil.transpose(op))
        assert np.array_equal(orient(image, orientation).permute(1, 2, 0).numpy(), want), orientation


def test_a_jpeg_the_device_refuses_falls_back_to_the_cpu_path_per_sample():
    cases = zoo_cases()
    cfg = DecodeConfig(image_size=64)
    good = cases["jpeg_ok"].data
    datas = [good, cases["jpeg_truncated"].data, cases["png_ok"].data, good, cases["jpeg_grayscale"].data]
    batch = encoded(datas, cfg)
    assert batch.jpeg_at == [0, 1, 3, 4] and batch.pixels_at == [2]
    out = decode_batch(batch, 64, "cpu")
    # The truncated JPEG fails the batched call; the others still decode on the device, one by one, and the
    # truncated one gets decode_image's own verdict and message.
    assert out.index == [0, 2, 3, 4] and out.fallbacks == 1
    with pytest.raises(Exception) as cpu_error:
        decode_image(cases["jpeg_truncated"].data, cfg)
    assert out.errors == [(1, str(cpu_error.value))] and "truncated" in out.errors[0][1]
    assert np.array_equal(out.pixels[1].numpy(), decode_image(cases["png_ok"].data, cfg).pixels)


@pytest.fixture(scope="module")
def zoo_shard(tmp_path_factory) -> Path:
    """One tar shard: good JPEGs (EXIF-rotated, progressive, grey), other formats and every broken input."""
    samples = make_corpus(np.random.default_rng(2), 9, exts=("jpg", "jpg", "png"), prefix="good-")
    samples += [ShardSample(key=f"zoo-{name}", image=case.data, ext=case.ext or "jpg")
                for name, case in sorted(zoo_cases().items()) if case.data]
    samples += [ShardSample(key=f"rot-{o}", image=jpeg_with_orientation(o)) for o in (3, 6, 8)]
    path = tmp_path_factory.mktemp("device-decode") / "00000.tar"
    path.write_bytes(tar_bytes(samples))
    return path


@pytest.fixture(scope="module")
def demo_worker() -> ModelWorker:
    return ModelWorker(ModelSpec(model="demo", device="cpu", torch_threads=1))


def run_shard(shard_path: Path, out: Path, decode_device: str, submit, fetch=lambda r: r) -> tuple[dict, dict]:
    """Return (shard rows by key, error rows by key) of process_shard over ``shard_path`` committed under ``out``."""
    cfg = EmbedConfig(inputs=[str(shard_path)], output=str(out), batch_size=8, decode_device=decode_device)
    facts = ModelFacts(image_size=64, embed_dim=128, scorer_gflops=0.0)
    (shard,) = expand_inputs(cfg.inputs, {})
    row = process_shard(shard, 0, cfg, facts, submit=submit, fetch=fetch)
    rows = {r["key"]: r for r in pq.read_table(out / "shards" / "part-00000.parquet").to_pylist()}
    errors = {r["key"]: r for r in pq.read_table(out / "errors" / "part-00000.parquet").to_pylist()}
    assert (row["rows"], row["errors"]) == (len(rows), len(errors))
    return rows, errors


def test_byte_shipping_gives_the_rows_and_error_rows_of_the_cpu_path(zoo_shard, demo_worker, tmp_path):
    cpu_rows, cpu_errors = run_shard(zoo_shard, tmp_path / "cpu", "cpu", demo_worker.embed)
    shipped = []

    def submit(batch, keys):
        assert isinstance(batch, EncodedBatch)
        shipped.extend(batch.jpeg_at)
        return demo_worker.embed_encoded(batch, keys)

    dev_rows, dev_errors = run_shard(zoo_shard, tmp_path / "dev", "cuda", submit)
    assert len(shipped) >= 10  # the JPEGs went as bytes
    assert dev_rows.keys() == cpu_rows.keys() and len(cpu_rows) >= 15
    assert {k: (e["stage"], e["error"]) for k, e in dev_errors.items()} == \
        {k: (e["stage"], e["error"]) for k, e in cpu_errors.items()}
    assert "zoo-jpeg_truncated" in dev_errors  # refused by the device decoder, then by the CPU fallback
    for key, want in cpu_rows.items():
        got = dev_rows[key]
        assert (got["width"], got["height"], got["caption"], got["url"]) == \
            (want["width"], want["height"], want["caption"], want["url"]), key
        cosine = float(np.dot(np.asarray(got["embedding"], np.float32), np.asarray(want["embedding"], np.float32)))
        assert cosine > 0.995, (key, cosine)


def test_byte_shipping_through_a_ray_model_actor(zoo_shard, ray_session, tmp_path):
    import ray

    actor = ray.remote(ModelActor).options(num_cpus=1).remote(ModelSpec(model="demo", device="cpu", torch_threads=1))
    try:
        rows, errors = run_shard(zoo_shard, tmp_path / "ray", "cuda",
                                 submit=lambda batch, keys: actor.embed_encoded.remote(batch, keys),
                                 fetch=lambda ref: ray.get(ref, timeout=120))
    finally:
        ray.kill(actor)
    assert "rot-6" in rows and "zoo-jpeg_truncated" in errors and "zoo-png_ok" in rows
    assert all(np.isfinite(np.asarray(r["embedding"], np.float32)).all() for r in rows.values())


def test_decode_device_cuda_is_refused_where_the_model_gets_no_gpu(tmp_path, capsys):
    from jobs.embed import main
    from pipeline.embed.validate import ArgumentProblem, check_decode_device, cuda_device_count

    def cfg(**kw) -> EmbedConfig:
        return EmbedConfig(inputs=[str(tmp_path / "in")], output=str(tmp_path / "run"), decode_device="cuda", **kw)

    with pytest.raises(ArgumentProblem, match="--device cpu puts the model on the CPU"):
        check_decode_device(cfg(spec=ModelSpec(device="cpu")))
    check_decode_device(cfg(address="ray://head:10001"))  # a cluster's actors are checked once they start
    if cuda_device_count() == 0:
        (tmp_path / "in").mkdir()
        assert main([str(tmp_path / "in"), "-o", str(tmp_path / "run"), "--decode-device", "cuda"]) == 2
        assert "this machine has no CUDA device" in capsys.readouterr().err
