"""What a `icar train-exits` run is given (``ExitTrainConfig``), the files it keeps in OUTPUT, and its error.

The bottom of the exit-training modules: the pair readers (``pairs``, ``shares``), the feature cache
(``features``), the loss (``exit_step``) and the loop (``exits``) all read the same configuration.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.io import storage

CHECKPOINT = "checkpoint.pt"
HEADS = "exit_heads.safetensors"
METRICS = "metrics.json"
BACKBONE_DIR = "backbone"  # fine-tuned backbone (finetune_backbone only): a model directory for --model
NO_PAIRS = ("no usable image–caption pairs: every sample lacked a caption or failed to decode (see the counts "
            "above); train-exits needs captioned images")


class TrainExitsError(RuntimeError):
    """Training cannot start or go on as configured; the message says why and what to do."""


@dataclass
class ExitTrainConfig:
    """Everything `icar train-exits` needs; see `icar train-exits --help` for the user's view."""

    inputs: list[str]  # training image–caption shards (tar / Parquet / folders; paths, globs, URLs)
    output: str  # output directory (local or URL): heads, metrics, checkpoint, feature cache
    model: str = "demo"  # open_clip model name, "demo", or a model directory
    pretrained: str | None = None  # open_clip tag, checkpoint path, or "none" (seeded random init)
    seed: int = 0  # seed of the random init (pretrained none) and of shuffling
    exits: list[int] | None = None  # exit depths (last = full depth); None: the model's default
    val_inputs: list[str] | None = None  # validation shards; None: hold out val_fraction of inputs by key hash
    val_fraction: float = 0.1  # share of training keys held out for validation when val_inputs is None
    max_train: int | None = None  # use at most this many training pairs (smoke runs; fine-tune: of those read)
    max_val: int | None = 2000  # use at most this many validation pairs (recall is computed over all of them)
    epochs: int = 10  # passes over the training pairs
    batch_size: int = 128  # pairs per step (contrastive negatives come from the batch)
    lr: float = 1e-4  # learning rate of heads and temperatures
    backbone_lr: float = 1e-6  # learning rate of the vision backbone (finetune_backbone only)
    weight_decay: float = 0.0  # AdamW weight decay (heads start at the tower's proj; decay would pull them away)
    contrastive_weight: float = 1.0  # weight of the CLIP contrastive loss of each exit
    distill_weight: float | None = None  # weight of 1 - cos(exit, full); None: 1.0 frozen, 0.0 with finetune
    learn_temperature: bool = True  # learn one logit scale per exit (initialised from the model's)
    mixed_gallery: bool = True  # frozen: contrastive negatives at every depth, as in an index of routed rows
    select_epoch: str = "mixed"  # frozen: keep the epoch with the best val mixed-gallery recall@1 ("mixed"), or "last"
    finetune_backbone: bool = False  # the paper's recipe: backbone trains too (new model; see module doc)
    merge: str | None = None  # token-merging schedule the heads will serve under (pipeline.model.merging spec, e.g. keep0.8)
    full_path_weight: float = 0.5  # finetune: weight of the full-depth contrastive loss (early exits share 1 - it)
    device: str = "auto"  # auto | cpu | cuda
    workers: int = 1  # data-parallel processes to start on this machine (one GPU each on CUDA); or use torchrun
    extract_batch_size: int = 64  # images per forward pass while extracting features
    shuffle_buffer: int = 2048  # finetune: pairs held for shuffling while streaming the shards each epoch
    resume: bool = False  # continue from OUTPUT/checkpoint.pt
    image_column: str | None = None  # Parquet image-bytes column; None: auto-detect
    storage_options: dict = field(default_factory=dict)  # fsspec options for inputs and output



def write_output(url: str, data: bytes, cfg: ExitTrainConfig) -> None:
    """Write ``data`` to ``url`` atomically with the run's storage options."""
    storage.atomic_write_bytes(url, data, cfg.storage_options)


def read_output(url: str, cfg: ExitTrainConfig) -> bytes | None:
    """Return the bytes of ``url``, or None when it does not exist (no cache, no checkpoint yet)."""
    fs, path = storage.filesystem(url, cfg.storage_options)
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as f:
        return f.read()
