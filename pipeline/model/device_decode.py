"""JPEG decoding on the model's device: an EncodedBatch -> uint8 pixels (N, S, S, 3) there, plus per-sample errors.

``icar embed --decode-device cuda`` ships JPEG bytes from the shard tasks to the model actor, which decodes them
in batches with ``torchvision.io.decode_jpeg(..., device="cuda")`` (nvJPEG) and resizes and centre-crops them on
the GPU, so a GPU is not starved by the CPUs decoding for it. The same code runs with ``device="cpu"`` (libjpeg),
which is how the tests exercise it.

Pixels follow open_clip's eval preprocess like the CPU path (pipeline.io.decode): shortest side -> S with
antialiased bicubic, long side truncated with ``int``, centre crop at ``int(round((h - S) / 2))``. Not bit-exact:
the resize runs in float32 (torchvision's antialiased bicubic, PIL's kernel and pass order, rounded to uint8
between passes as PIL does), the CPU path's JPEG draft mode is not used (big JPEGs are decoded whole), and
nvJPEG's IDCT and chroma upsampling differ from libjpeg's; docs/benchmarks/gpu-check.md states the measured
tolerance. A JPEG the device cannot decode falls back to ``decode_image`` on the actor's CPU, one sample at a
time; one that fails there too becomes an error row, with the message the CPU path would have written.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.io.decode import DecodeConfig, DecodeError, EncodedBatch, JpegHeader, decode_image

log = logging.getLogger(__name__)

# Decoded source pixels per decode_jpeg call: a batch of 512 camera photos (12 Mpx each) would otherwise hold
# ~18 GB of full-size pixels at once. 64 Mpx is ~190 MB of uint8 (plus one image's float copy while resizing).
MAX_CHUNK_PIXELS = 64_000_000


@dataclass
class DeviceDecoded:
    """The decoded batch: pixels of the samples that decoded, in batch order, and why the others did not."""

    pixels: torch.Tensor  # uint8 (len(index), S, S, 3) on the decode device
    index: list[int]  # batch positions of the rows of ``pixels``
    errors: list[tuple[int, str]] = field(default_factory=list)  # (batch position, DecodeError message)
    fallbacks: int = 0  # JPEGs the device could not decode, decoded (or refused) by decode_image instead
    seconds: float = 0.0


def decode_batch(batch: EncodedBatch, image_size: int, device: str | torch.device) -> DeviceDecoded:
    """Return the pixels (on ``device``) of every sample of ``batch`` that decodes, and the errors of the others."""
    t0 = time.perf_counter()
    out = torch.empty((batch.size, image_size, image_size, 3), dtype=torch.uint8, device=device)
    ok = np.zeros(batch.size, bool)
    if len(batch.pixels_at):
        out[torch.as_tensor(batch.pixels_at, dtype=torch.long, device=device)] = \
            torch.from_numpy(_writable(batch.pixels)).to(device, non_blocking=True)
        ok[batch.pixels_at] = True
    errors: list[tuple[int, str]] = []
    fallbacks = 0
    cfg = DecodeConfig(image_size=image_size, max_pixels=batch.max_pixels)
    for chunk in _chunks(batch.headers):
        decoded = _decode_jpegs([batch.jpegs[j] for j in chunk], device)
        for j, image in zip(chunk, decoded):
            at = batch.jpeg_at[j]
            if image is not None:
                out[at] = resize_center_crop(orient(image, batch.headers[j].orientation), image_size)
                ok[at] = True
                continue
            fallbacks += 1
            try:  # per sample, the CPU path: a JPEG nvJPEG refuses may still be one Pillow reads
                out[at] = torch.from_numpy(decode_image(batch.jpegs[j], cfg).pixels).to(device)
                ok[at] = True
            except DecodeError as e:
                errors.append((at, str(e)))
    index = np.flatnonzero(ok).tolist()
    pixels = out if len(index) == batch.size else out[torch.as_tensor(index, dtype=torch.long, device=device)]
    return DeviceDecoded(pixels=pixels, index=index, errors=sorted(errors), fallbacks=fallbacks,
                         seconds=time.perf_counter() - t0)


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """Return ``image`` (3, H, W) turned upright for EXIF ``orientation`` 1..8, as PIL's ``exif_transpose`` does."""
    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(-1, -2)
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:  # transpose
        return image.transpose(-1, -2)
    if orientation == 6:  # rotate 90 degrees clockwise
        return image.transpose(-1, -2).flip(-1)
    if orientation == 7:  # transverse
        return image.transpose(-1, -2).flip(-1, -2)
    if orientation == 8:  # rotate 90 degrees counter-clockwise
        return image.transpose(-1, -2).flip(-2)
    return image


def resize_center_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    """Return uint8 (size, size, 3): ``image`` (3, H, W) with its shortest side -> ``size``, then centre-cropped.

    The output size and crop offsets are pipeline.io.decode.resize_center_crop's (open_clip's); the resampling is
    antialiased bicubic in float32, one axis at a time (PIL's filter and pass order, not its fixed-point arithmetic).
    """
    from torchvision.transforms.v2 import functional as TF  # lazy: torchvision costs ~0.5 s to import

    h, w = image.shape[-2:]
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    # Two one-axis passes, horizontal first, rounded to uint8 between them, as PIL does: bicubic overshoots at
    # sharp edges, and PIL clips that overshoot after its first pass (one float pass differed by up to 16 grey
    # levels at such edges, measured on the demo corpus at 224 px). Pillow 13 runs the vertical pass first for
    # some sizes; those images differ by up to ~6 grey levels at sharp edges (docs/benchmarks/gpu-check.md).
    for target in ([h, new_w], [new_h, new_w]):
        if tuple(image.shape[-2:]) != tuple(target):
            image = TF.resize(image.float(), target, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
            image = image.round_().clamp_(0, 255).to(torch.uint8)
    return image[:, top:top + size, left:left + size].permute(1, 2, 0)


def _chunks(headers: list[JpegHeader]) -> list[list[int]]:
    """Return the JPEG indices split into runs of at most MAX_CHUNK_PIXELS source pixels (at least one each)."""
    chunks: list[list[int]] = []
    current: list[int] = []
    pixels = 0
    for j, h in enumerate(headers):
        n = h.width * h.height
        if current and pixels + n > MAX_CHUNK_PIXELS:
            chunks.append(current)
            current, pixels = [], 0
        current.append(j)
        pixels += n
    if current:
        chunks.append(current)
    return chunks


def _decode_jpegs(jpegs: list[bytes], device) -> list[torch.Tensor | None]:
    """Return each JPEG decoded to uint8 RGB (3, H, W) on ``device``, None where the decoder refuses it.

    One batched call first (nvJPEG decodes a list in one go); when it raises, the batch is retried one JPEG at
    a time, so one corrupt file costs its own row only.
    """
    from torchvision.io import ImageReadMode, decode_jpeg  # lazy: torchvision costs ~0.5 s to import

    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in jpegs]
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its decoders in favour of TorchCodec, which offers no batched nvJPEG decode.
        warnings.filterwarnings("ignore", message=".*decoding and encoding capabilities of TorchVision.*")
        try:
            return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
        except RuntimeError as e:
            if len(data) == 1:
                log.debug("decode_jpeg refused a JPEG: %s", e)
                return [None]
        out: list[torch.Tensor | None] = []
        for one in data:
            try:
                out.append(decode_jpeg(one, mode=ImageReadMode.RGB, device=device))
            except RuntimeError as e:
                log.debug("decode_jpeg refused a JPEG: %s", e)
                out.append(None)
        return out


def _writable(a: np.ndarray) -> np.ndarray:
    """Return ``a``, copied when it is read-only (Ray's object-store views; torch warns on sharing those)."""
    return a if a.flags.writeable else a.copy()
