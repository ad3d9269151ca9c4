"""Complexity scorers: how visually complex each image is, in [0, 1], from the decoded uint8 batch.

Two kinds:

- ``HeuristicScorer`` (training-free, no weights): edge density, see its docstring for the definition and why.
- ``TrainedScorer`` (ConvNeXt-IC and friends): a backbone (timm ConvNeXt by default; any timm or torchvision
  classifier can be plugged in, see ``create_backbone``) and a linear head that classifies into K ordered
  complexity bins; the score is the expected bin value, softmax(logits) · bin centres.

The shipped default (pipeline/assets/scorer/default.safetensors) is a ``TrainedScorer``: ImageNet MobileNetV2
fine-tuned on SAVOIAS's human ratings; its card (default.json) holds its sources, licences and metrics, and
``python -m jobs.train_scorer`` rebuilds it. ``load_scorer`` picks one. Every scorer takes the uint8 batch (N, S, S, 3) the encoder gets, resizes it to
its own input size itself, and reports its GFLOPs per image so each row's cost includes it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from pipeline.io import storage
from pipeline.model import models
from pipeline.model.flops import cached_gflops, count_gflops
from pipeline.model.scorer_identity import (CARD_KEY, DEFAULT_CHECKPOINT, HEURISTIC_EDGE_THRESHOLD,
                                            HEURISTIC_INPUT_SIZE, SHIPPED_NAME, demo_scorer_choice,
                                            heuristic_identity)

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CARD_FORMAT = 1  # version of the checkpoint card


# ----------------------------------------------------------------------------------------- preprocessing


def uint8_batch(pixels) -> torch.Tensor:
    """Return a uint8 batch (N, H, W, 3) as a tensor, sharing the array's memory unless it is read-only.

    Ray hands actors read-only numpy views of the object store; torch cannot share those safely (and warns
    once per process), so only they are copied.
    """
    if isinstance(pixels, np.ndarray) and not pixels.flags.writeable:
        pixels = pixels.copy()
    x = torch.as_tensor(pixels)
    if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != torch.uint8:
        raise ValueError(f"expected a uint8 batch (N, H, W, 3), got {x.dtype} of shape {tuple(x.shape)}")
    return x


def to_float_batch(pixels, input_size: int, device: str | torch.device = "cpu",
                   mean: tuple = IMAGENET_MEAN, std: tuple = IMAGENET_STD) -> torch.Tensor:
    """Return the normalised float batch (N, 3, input_size, input_size) for a uint8 batch (N, H, W, 3).

    Resizes with bilinear interpolation and antialiasing (so a downscale averages detail instead of aliasing
    it, which would fake complexity), then applies ImageNet mean/std. Training and scoring both go through
    here, so a trained scorer sees at inference exactly the pixels it was trained on.
    """
    x = uint8_batch(pixels).to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
    if x.shape[-2:] != (input_size, input_size):
        x = F.interpolate(x, size=(input_size, input_size), mode="bilinear", antialias=True, align_corners=False)
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


# ---------------------------------------------------------------------------------------- heuristic


class HeuristicScorer:
    """Training-free complexity: edge density, the share of pixels on a visible luminance edge.

    Definition (deterministic, vectorised, no weights): resize the batch to ``input_size`` = 128 px
    (bilinear, antialiased), take luminance Y = 0.299 R + 0.587 G + 0.114 B in [0, 1], Sobel gradients
    normalised so that a step edge of height h has magnitude h, and count the interior pixels whose
    magnitude exceeds ``edge_threshold`` = 0.1 (a 10 % luminance step, well above JPEG noise). The score is
    that count ÷ interior pixels, in [0, 1].

    Why edge density: it is the classic training-free complexity measure (IC9600 reports PLCC 0.57 for it,
    against 0.23 for compression ratio); it depends only on the decoded pixels, not on how a file was
    encoded (compressed bytes per pixel on web data largely measures the JPEG quality setting); and it is
    one small convolution. Why 128 px: complexity as people rate it is about structure (objects, regions,
    clutter), and at full resolution the count is dominated by fine texture and noise. Measured on the four
    SAVOIAS categories of ../shared/savoias (mean of per-category SRCC): 0.59 at 224 px, 0.64 at 128 px,
    and 0.64-0.68 anywhere from 64 to 128 px at thresholds 0.05-0.1. 128 px and 0.1 are round values from
    that flat plateau, not its best cell (0.68 at 64 px, 0.05), to avoid tuning to those four categories.
    Images already smaller than that are best analysed at their own size (upsampling adds no structure): the
    demo's 64 px images score closer to its ground truth at 64 px (PLCC 0.67, SRCC 0.76) than upsampled to
    128 (0.59, 0.74), at a tenth of the cost; pipeline/assets/demo/scorer.json says so.

    The raw score is a share of pixels, not a human rating: it orders images (SRCC) but is not calibrated
    to any label scale, so RMSE/MAE against labels need a fitted map (``icar eval-complexity --fit-labels``).

    GFLOPs: not a network, so counted by hand, honestly: per output pixel the antialiased bilinear resize
    reads about ``4·(S/input_size)²`` taps × 3 channels × 2 FLOPs, luminance 5 FLOPs, two 3×3 Sobel
    filters 2·9·2 = 36 FLOPs, magnitude and threshold 4 FLOPs: about 0.0019 GFLOPs per image from a
    224 px batch (0.3 % of one ViT-B-32 block). ``gflops_per_image`` reports it for S = ``source_size``
    (224 unless the caller passes the size its images are decoded at; ``scorer_for_model`` takes it).
    """

    kind = "heuristic"

    def __init__(self, input_size: int = HEURISTIC_INPUT_SIZE, edge_threshold: float = HEURISTIC_EDGE_THRESHOLD,
                 device: str = "cpu", source_size: int = 224):
        if int(input_size) < 3:
            raise ValueError(f"heuristic input_size must be at least 3 px (a 3x3 Sobel needs an interior), "
                             f"got {input_size}")
        if not 0.0 < float(edge_threshold) <= 1.0:
            raise ValueError(f"heuristic edge_threshold is a luminance step in (0, 1], got {edge_threshold}")
        self.input_size = int(input_size)  # analysis resolution; the decoded batch is resized to it
        self.edge_threshold = float(edge_threshold)  # luminance step (0..1) that counts as an edge
        self.device = torch.device(device)
        self.name = "heuristic-edge-density"
        self.identity = heuristic_identity(self.input_size, self.edge_threshold)
        self.source_size = int(source_size)  # the typical decoded size S, for the cost estimate only
        self.gflops_per_image = self.estimate_gflops(self.source_size)
        # Luminance weights with the 1/255 of uint8 -> [0, 1] folded in.
        self._luma = (torch.tensor([0.299, 0.587, 0.114]) / 255.0).to(self.device)
        # The Sobel below is left unnormalised (4x the definition's), so compare its squared magnitude with
        # (4 * threshold)^2: no division and no square root per pixel.
        self._limit = (4.0 * self.edge_threshold) ** 2

    def estimate_gflops(self, source_size: int) -> float:
        """Return the hand-counted GFLOPs per image when scoring a batch decoded at ``source_size``.

        Counts the definition (3-channel resize, then luminance, Sobel, threshold), an upper bound on what
        ``score`` computes. An antialiased downscale reads about 4·(S/input_size)² taps per output pixel; an
        upscale is plain bilinear (4 taps: antialiasing widens nothing when S < input_size).
        """
        out = self.input_size ** 2
        if source_size == self.input_size:
            resize = 0.0
        else:
            taps = 4.0 * (source_size / self.input_size) ** 2 if source_size > self.input_size else 4.0
            resize = out * taps * 3 * 2
        return (resize + out * (5 + 36 + 4)) / 1e9

    @torch.inference_mode()
    def score(self, pixels: np.ndarray) -> np.ndarray:
        """Return the edge density (float32 in [0, 1]) of each image of a uint8 batch (N, H, W, 3)."""
        x = uint8_batch(pixels)
        if len(x) == 0:
            return np.zeros(0, np.float32)
        # Chunks of ~2^18 source pixels: large float temporaries cost more in page faults than in arithmetic
        # (measured at 224 px: 2.5x slower as one batch of 100), and a chunk bounds memory on any batch size.
        step = max(1, (1 << 18) // (x.shape[1] * x.shape[2]))
        return np.concatenate([self._density(x[i:i + step]) for i in range(0, len(x), step)])

    def _density(self, x: torch.Tensor) -> np.ndarray:
        """Return the edge density of a uint8 batch (n, H, W, 3); ``score`` documents the definition."""
        size = self.input_size
        # Luminance first, then resize: exact, not an approximation. Bilinear resizing (antialiased or not)
        # maps every channel with the same weights, i.e. it is one linear map R applied per channel, and
        # luminance is a fixed linear mix of channels, so R(0.299 r + 0.587 g + 0.114 b) = 0.299 R(r) +
        # 0.587 R(g) + 0.114 R(b). Resizing one plane instead of three only reorders float rounding (at most
        # a pixel sitting exactly on the threshold flips). The old mean 0 / std 1 normalisation was the identity.
        y = (x.to(self.device).float() @ self._luma).unsqueeze(1)  # (n, 1, H, W) in [0, 1]
        if y.shape[-2:] != (size, size):
            down = y.shape[-2] > size or y.shape[-1] > size  # antialiasing only matters when shrinking
            y = F.interpolate(y, size=(size, size), mode="bilinear", antialias=down, align_corners=False)
        y = y[:, 0]
        # Separable 3x3 Sobel on the interior (the definition's valid convolution): a central difference along
        # one axis smoothed by (1, 2, 1) along the other; 4x the normalised gradient, see self._limit.
        dx = y[:, :, 2:] - y[:, :, :-2]
        gx = dx[:, :-2] + 2.0 * dx[:, 1:-1] + dx[:, 2:]
        dy = y[:, 2:] - y[:, :-2]
        gy = dy[:, :, :-2] + 2.0 * dy[:, :, 1:-1] + dy[:, :, 2:]
        edges = (gx * gx + gy * gy) > self._limit
        return edges.float().mean(dim=(1, 2)).cpu().numpy().astype(np.float32)


# ------------------------------------------------------------------------------------------ backbones


def _timm_backbone(arch: str) -> nn.Module:
    """Return a timm model without its classifier (random init: pretrained weights come from a local file)."""
    import timm  # lazy: ~1.7 s to import, paid only by jobs that build a timm backbone

    if not timm.is_model(arch.split(".")[0]):  # a ".tag" suffix names pretrained weights, not the architecture
        close = timm.list_models(f"*{arch.split('_')[0]}*")[:12]
        raise ValueError(f"timm has no model {arch!r}; similar names: {close}")
    return timm.create_model(arch, pretrained=False, num_classes=0)


def _torchvision_backbone(arch: str) -> nn.Module:
    """Return a torchvision classifier with its last classification layer replaced by Identity (random init)."""
    import torchvision  # lazy: paid only by jobs that build a torchvision backbone

    try:
        model = torchvision.models.get_model(arch, weights=None)
    except ValueError as e:
        raise ValueError(f"torchvision has no model {arch!r}: {e}") from e
    for attr in ("fc", "classifier", "head", "heads"):
        if hasattr(model, attr):
            layer = getattr(model, attr)
            if isinstance(layer, nn.Sequential) and len(layer) and isinstance(layer[-1], nn.Linear):
                layer[-1] = nn.Identity()  # keeps norm/pooling/dropout that precede the last Linear
            else:
                setattr(model, attr, nn.Identity())
            return model
    raise ValueError(f"torchvision model {arch!r} has no fc/classifier/head attribute to remove")


# Sources of backbones, by the prefix of the backbone name ("torchvision:mobilenet_v2"); a bare name is timm.
# Other packages register here (register_backbone_source) without touching the scorer.
BACKBONE_SOURCES: dict[str, Callable[[str], nn.Module]] = {"timm": _timm_backbone,
                                                           "torchvision": _torchvision_backbone}


def register_backbone_source(prefix: str, builder: Callable[[str], nn.Module]) -> None:
    """Make ``prefix:arch`` backbone names build with ``builder(arch)`` (a module returning (N, C) features)."""
    BACKBONE_SOURCES[prefix] = builder


def create_backbone(name: str) -> tuple[nn.Module, int]:
    """Return (feature extractor, feature width) for ``name``: "convnext_atto", "timm:...", "torchvision:..."."""
    source, sep, arch = name.partition(":")
    if not sep:
        source, arch = "timm", name
    if source not in BACKBONE_SOURCES:
        raise ValueError(f"unknown backbone source {source!r} in {name!r}; known: {sorted(BACKBONE_SOURCES)}")
    module = BACKBONE_SOURCES[source](arch)
    was_training = module.training
    module.eval()
    with torch.no_grad():  # the feature width, measured rather than read from per-library attributes
        width = int(module(torch.zeros(1, 3, 64, 64)).flatten(1).shape[1])
    module.train(was_training)
    return module, width


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Return the tensors of a safetensors file or a torch checkpoint (loaded with weights_only=True)."""
    fs, p = storage.filesystem(path)
    with fs.open(p, "rb") as f:
        data = f.read()
    if path.endswith(".safetensors"):
        return st_load(data)
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "model_state_dict", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict of tensors")
    return state


def load_backbone_weights(backbone: nn.Module, path: str) -> dict:
    """Load pretrained weights from a local file into ``backbone``; return what was loaded (for the card).

    Keys are matched by name after stripping a "module." prefix; where few match and the backbone's timm
    module offers ``checkpoint_filter_fn`` (e.g. original FAIR ConvNeXt files), that conversion is applied.
    The checkpoint's own classifier (absent from the backbone) is ignored and listed; any backbone weight
    missing from the file, or of another shape, is an error.
    """
    state = {k.removeprefix("module."): v for k, v in _read_state_dict(path).items()}
    own = backbone.state_dict()
    if sum(k in own for k in state) < len(own) / 2:
        filter_fn = getattr(sys.modules.get(type(backbone).__module__), "checkpoint_filter_fn", None)
        if filter_fn is not None:
            state = filter_fn(state, backbone)
    missing = [k for k in own if k not in state]
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}" for k, v in own.items()
             if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or wrong:
        raise ValueError(f"backbone weights {path} do not fit this backbone: {len(missing)} missing "
                         f"(e.g. {missing[:5]}), {len(wrong)} of another shape (e.g. {wrong[:3]}); "
                         "pass weights of the same architecture as --backbone")
    ignored = sorted(k for k in state if k not in own)
    backbone.load_state_dict({k: state[k] for k in own}, strict=True)
    sha = hashlib.sha256(b"".join(t.detach().cpu().contiguous().numpy().tobytes() for t in
                                  (state[k] for k in sorted(own)))).hexdigest()
    log.info("loaded %d backbone tensors from %s (ignored %d, e.g. %s)", len(own), path, len(ignored), ignored[:4])
    return {"path": str(path), "tensors_sha256": sha, "loaded": len(own), "ignored": ignored}


# ------------------------------------------------------------------------------------------ the model


def bin_centres(bins: int) -> torch.Tensor:
    """Return the K bin centres 0, 1/(K-1), ..., 1 (the ends included, so every score in [0, 1] is reachable)."""
    if bins < 2:
        raise ValueError(f"need at least 2 complexity bins, got {bins}")
    return torch.linspace(0.0, 1.0, bins)


class ComplexityNet(nn.Module):
    """ConvNeXt-IC: backbone features -> linear head over K ordered complexity bins.

    ``forward`` returns the bin logits; ``expected_score`` turns them into the score in [0, 1].
    """

    def __init__(self, backbone: str = "convnext_atto", bins: int = 10, dropout: float = 0.0):
        super().__init__()
        self.backbone_name = backbone
        self.bins = int(bins)
        self.backbone, self.num_features = create_backbone(backbone)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(self.num_features, self.bins)
        nn.init.normal_(self.head.weight, std=0.01)  # start near a uniform bin distribution (score 0.5)
        nn.init.zeros_(self.head.bias)
        self.register_buffer("centres", bin_centres(self.bins), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the bin logits (N, K) of a normalised float batch (N, 3, H, W)."""
        features = self.backbone(x)
        if features.ndim > 2:
            features = features.flatten(1)
        return self.head(self.dropout(features))

    def feature_blocks(self) -> nn.Sequential:
        """Return the backbone's sequence of feature blocks (torchvision's ``features``), for partial fine-tuning.

        Only backbones whose forward is ``features -> global average pool -> flatten -> classifier`` qualify
        (torchvision MobileNetV2/V3, EfficientNet, MNASNet...); others raise, naming the backbone.
        """
        blocks = getattr(self.backbone, "features", None)
        if not isinstance(blocks, nn.Sequential) or not hasattr(self.backbone, "classifier"):
            raise ValueError(f"backbone {self.backbone_name!r} has no `features` block sequence and `classifier`: "
                             "partial fine-tuning (--trainable-blocks) supports torchvision MobileNet/EfficientNet-"
                             "style backbones; train the whole backbone instead (omit --trainable-blocks)")
        return blocks

    def _split_at(self, trainable_blocks: int) -> int:
        """Return the index of the first trainable feature block, or raise when ``trainable_blocks`` is out of range."""
        n = len(self.feature_blocks())
        if not 1 <= trainable_blocks <= n:
            raise ValueError(f"--trainable-blocks must be in [1, {n}] for {self.backbone_name}, got {trainable_blocks}")
        return n - trainable_blocks

    def forward_frozen(self, x: torch.Tensor, trainable_blocks: int) -> torch.Tensor:
        """Return the activations entering the last ``trainable_blocks`` feature blocks for a normalised batch."""
        return self.feature_blocks()[: self._split_at(trainable_blocks)](x)

    def forward_tail(self, h: torch.Tensor, trainable_blocks: int) -> torch.Tensor:
        """Return the bin logits from ``forward_frozen``'s activations: forward_tail(forward_frozen(x)) == forward(x)."""
        f = self.feature_blocks()[self._split_at(trainable_blocks):](h)
        f = self.backbone.classifier(torch.flatten(F.adaptive_avg_pool2d(f, 1), 1))
        return self.head(self.dropout(f))

    def expected_score(self, logits: torch.Tensor) -> torch.Tensor:
        """Return softmax(logits) · bin centres: the expected complexity in [0, 1]."""
        return torch.softmax(logits.float(), dim=-1) @ self.centres.to(logits.device).float()


# ------------------------------------------------------------------------------------------ checkpoints


def save_checkpoint(model: ComplexityNet, card: dict, url: str, dtype: torch.dtype | None = None) -> str:
    """Write ``model`` as safetensors with ``card`` in its metadata (and a sidecar .json); return its sha256.

    ``dtype`` (e.g. torch.float16) stores floating-point tensors in that type to halve the file;
    ``load_checkpoint`` casts them back into the float32 model. Integer buffers are kept as they are.
    """
    card = {"format": CARD_FORMAT, "kind": "complexity-net", "backbone": model.backbone_name,
            "bins": model.bins, **card}
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        card["storage_dtype"] = str(dtype).removeprefix("torch.")
    data = st_save(state, metadata={CARD_KEY: json.dumps(card, sort_keys=True)})
    storage.atomic_write_bytes(url, data)
    sha = hashlib.sha256(data).hexdigest()
    storage.write_json({**card, "sha256": sha}, _card_url(url))
    return sha


def _card_url(url: str) -> str:
    """Return the sidecar card path of a checkpoint: x.safetensors -> x.json."""
    return (url[: -len(".safetensors")] if url.endswith(".safetensors") else url) + ".json"


def load_checkpoint(url: str, device: str = "cpu") -> tuple[ComplexityNet, dict, str]:
    """Return (model in eval mode, card, sha256) from a ComplexityNet safetensors checkpoint."""
    fs, path = storage.filesystem(url)
    if not fs.exists(path):
        raise FileNotFoundError(f"scorer checkpoint {url} does not exist; train one with `icar train-complexity`")
    with fs.open(path, "rb") as f:
        data = f.read()
    meta = storage.safetensors_metadata(data)
    if CARD_KEY not in meta:
        raise ValueError(f"{url} has no ICAR card in its metadata; it is not a checkpoint written by "
                         "`icar train-complexity` (raw backbone weights go to --backbone-weights)")
    card = json.loads(meta[CARD_KEY])
    if card.get("format", 1) > CARD_FORMAT:
        raise ValueError(f"{url} has card format {card['format']}, newer than this icar ({CARD_FORMAT}); upgrade")
    model = ComplexityNet(card["backbone"], bins=int(card["bins"]))
    model.load_state_dict(st_load(data), strict=True)
    return model.to(device).eval(), card, hashlib.sha256(data).hexdigest()


class TrainedScorer:
    """A trained ComplexityNet (ConvNeXt-IC or another backbone) as a scorer."""

    kind = "convnext"

    def __init__(self, model: ComplexityNet, card: dict, checkpoint: str, sha256: str, device: str = "cpu",
                 max_batch: int = 256):
        self.model = model.to(device).eval()
        self.card = card
        self.device = torch.device(device)
        self.input_size = int(card["input_size"])
        self.mean = tuple(card.get("mean", IMAGENET_MEAN))
        self.std = tuple(card.get("std", IMAGENET_STD))
        self.max_batch = max_batch  # images per forward pass, bounds activation memory
        self.dtype = torch.float32  # what the network computes in (``cast``); its input is resized in float32
        self.name = f"complexity-net:{model.backbone_name}"
        self.identity = {"kind": self.kind, "name": self.name, "backbone": model.backbone_name,
                         "checkpoint": str(checkpoint), "sha256": sha256, "bins": model.bins,
                         "input_size": self.input_size, "trained_on": card.get("training", {}).get("data")}
        # Counted once per checkpoint and input size, then read from the GFLOP cache (pipeline.model.flops).
        self.gflops_per_image = cached_gflops(
            f"scorer|{sha256}|{self.input_size}",
            lambda: count_gflops(self.model, torch.zeros(1, 3, self.input_size, self.input_size, device=self.device)))

    def cast(self, dtype: torch.dtype) -> "TrainedScorer":
        """Compute in ``dtype`` from now on (a bf16 CPU worker: the scorer would otherwise be a third of its time);
        return self. Scores move by a few 1e-3 (0.0028 at most on 32 random images, MobileNetV2 at 160 px)."""
        self.model.to(dtype)
        self.dtype = dtype
        return self

    @torch.inference_mode()
    def score(self, pixels: np.ndarray) -> np.ndarray:
        """Return the expected complexity (float32 in [0, 1]) of each image of a uint8 batch (N, S, S, 3)."""
        out = []
        for start in range(0, len(pixels), self.max_batch):
            x = to_float_batch(pixels[start:start + self.max_batch], self.input_size, self.device,
                               self.mean, self.std).to(self.dtype)
            out.append(self.model.expected_score(self.model(x)).float().cpu().numpy())
        if not out:
            return np.zeros(0, np.float32)
        return np.clip(np.concatenate(out), 0.0, 1.0).astype(np.float32)


def load_scorer(kind: str = "default", checkpoint: str | None = None, device: str = "cpu", *,
                input_size: int | None = None, edge_threshold: float | None = None, source_size: int = 224):
    """Return the scorer named by ``kind``; None for kind "none" (no scorer: the caller routes without one).

    - "default": ``checkpoint`` if given, else the shipped checkpoint pipeline/assets/scorer/default.safetensors
      if it exists, else the heuristic (the log says which).
    - "heuristic": the training-free edge-density scorer (``checkpoint`` must be None); ``input_size`` and
      ``edge_threshold`` override its defaults (128 px, 0.1), ``source_size`` is the decoded size its GFLOPs
      are counted from.
    - "convnext": a ComplexityNet checkpoint written by `icar train-complexity` (any backbone its card names).

    Pick a model's scorer with ``scorer_for_model``, which knows the demo model's own choice.
    """
    options = {k: v for k, v in (("input_size", input_size), ("edge_threshold", edge_threshold)) if v is not None}
    if kind == "none":
        return None
    if kind == "heuristic":
        if checkpoint:
            raise ValueError("--scorer heuristic takes no checkpoint; use --scorer convnext --scorer-checkpoint PATH")
        scorer = HeuristicScorer(device=device, source_size=source_size, **options)
    elif kind in ("convnext", "default"):
        if checkpoint is None and kind == "convnext":
            raise ValueError("--scorer convnext needs a checkpoint (--scorer-checkpoint PATH.safetensors from "
                             "`icar train-complexity`)")
        path = checkpoint if checkpoint is not None else (str(DEFAULT_CHECKPOINT) if DEFAULT_CHECKPOINT.exists()
                                                          else None)
        if path is None:
            log.info("scorer: no shipped checkpoint at %s, using the training-free heuristic", DEFAULT_CHECKPOINT)
            scorer = HeuristicScorer(device=device, source_size=source_size, **options)
        else:
            if options:
                raise ValueError(f"{sorted(options)} set the heuristic scorer, but --scorer {kind} loads the trained "
                                 f"checkpoint {path} (its input size is in its card); drop them or use "
                                 "--scorer heuristic")
            model, card, sha = load_checkpoint(path, device)
            # The shipped file is named by its place in the package, not this checkout's absolute path, so a run
            # resumed from another checkout or cluster node has the same scorer identity (the sha256 pins it).
            shipped = checkpoint is None and Path(path) == DEFAULT_CHECKPOINT
            scorer = TrainedScorer(model, card, SHIPPED_NAME if shipped else path,
                                   sha, device)
    else:
        raise ValueError(f"unknown scorer kind {kind!r}; choose default, heuristic, convnext or none")
    log.info("scorer: %s (%.4f GFLOPs per image at %d px)", scorer.name, scorer.gflops_per_image, scorer.input_size)
    return scorer


def scorer_for_model(model_name: str, kind: str = "default", checkpoint: str | None = None, device="cpu",
                     image_size: int = 224):
    """Return the scorer ``icar embed --model model_name --scorer kind`` runs (None for kind "none").

    The one place that resolves it, so that `icar calibrate` calibrates for the scorer `icar embed` will run.
    With kind "default" and no checkpoint, the demo model uses its own choice,
    pipeline/assets/demo/scorer.json: ``{"kind": ..., "checkpoint"?: file beside it, "input_size"?,
    "edge_threshold"?}``; a 0.3-GFLOP trained scorer would cost 5x a tower this small. Every other case is
    ``load_scorer(kind, checkpoint)``. ``image_size``: the side the model decodes images to (its bundle's
    ``image_size``), which the heuristic's GFLOPs are counted from.
    """
    options: dict = {}
    # models.DEMO_DIR read at call time: tests point it at another demo directory.
    choice = demo_scorer_choice(models.DEMO_DIR) if model_name == "demo" and kind == "default" and checkpoint is None else None
    if choice is not None:
        kind = choice["kind"]
        checkpoint = str(models.DEMO_DIR / choice["checkpoint"]) if choice.get("checkpoint") else None
        options = {k: choice[k] for k in ("input_size", "edge_threshold") if k in choice}
    return load_scorer(kind, checkpoint, device=device, source_size=image_size, **options)
