"""The Parquet schemas of a run directory: the one place they are defined (DESIGN.md, data contracts)."""

from __future__ import annotations

import json
import math

import pyarrow as pa

SHARD_DIR = "shards"
ERROR_DIR = "errors"
MANIFEST = "manifest.parquet"
RUN_JSON = "run.json"


def shard_schema(dim: int) -> pa.Schema:
    """Return the embedding shard schema for embeddings of dimension ``dim`` (contract)."""
    return pa.schema(
        [
            pa.field("key", pa.string(), nullable=False),
            pa.field("source", pa.string(), nullable=False),
            pa.field("caption", pa.string()),
            pa.field("url", pa.string()),
            pa.field("width", pa.int32(), nullable=False),
            pa.field("height", pa.int32(), nullable=False),
            # Null only when the run was made with no scorer (--scorer none): never a made-up value.
            pa.field("complexity", pa.float32()),
            pa.field("exit_layer", pa.int16(), nullable=False),
            pa.field("gflops", pa.float32(), nullable=False),
            pa.field("embedding", pa.list_(pa.float16(), dim), nullable=False),
        ]
    )


ERROR_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string()),  # empty when the whole input shard failed
        pa.field("source", pa.string(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),  # read | decode | model | shard
        pa.field("error", pa.string(), nullable=False),
    ]
)

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string(), nullable=False),  # input shard URI
        pa.field("output", pa.string(), nullable=False),  # shards/part-NNNNN.parquet, relative to RUN
        pa.field("part", pa.int32(), nullable=False),
        pa.field("rows", pa.int64(), nullable=False),
        pa.field("errors", pa.int64(), nullable=False),
        pa.field("gflops", pa.float64(), nullable=False),
        pa.field("scorer_gflops", pa.float64(), nullable=False),
        pa.field("seconds", pa.float64(), nullable=False),  # wall time of the shard task
        pa.field("model_seconds", pa.float64(), nullable=False),  # time inside the model actor
        # Fingerprint of the input when it was embedded, so a scheduled reindex can see changed inputs.
        pa.field("source_size", pa.int64()),
        pa.field("source_mtime", pa.string()),
        pa.field("source_etag", pa.string()),
        # Routing seen in this shard: exit depth -> image count, and the score distribution.
        pa.field("exit_counts", pa.string(), nullable=False),  # JSON object {"12": 40, "24": 60}
        pa.field("complexity_mean", pa.float32()),
        pa.field("complexity_p10", pa.float32()),
        pa.field("complexity_p50", pa.float32()),
        pa.field("complexity_p90", pa.float32()),
        pa.field("committed_at", pa.string(), nullable=False),  # ISO-8601 UTC
    ]
)


def part_name(part: int) -> str:
    """Return the file name of output part ``part``: part-NNNNN.parquet."""
    return f"part-{part:05d}.parquet"


def model_key(identity: dict) -> str:
    """Return "name:weights_sha256", the key that must match between runs indexed together and a query encoder.

    ``identity`` is run.json's ``model`` (what pipeline.model.models.load_clip describes). Defined here, torch-free,
    so that the index, the searcher and the report can check it without importing torch.
    """
    missing = [k for k in ("name", "weights_sha256") if not identity.get(k)]
    if missing:
        raise ValueError(f"model identity lacks {missing}: {identity!r}; it must come from pipeline.model.models.load_clip")
    return f"{identity['name']}:{identity['weights_sha256']}"


# Per-exit similarity scales (issue #20): the exit-heads file's safetensors metadata key and run.json's field.
# JSON {"<exit depth>": scale}. Shards keep unit-length embeddings; `icar index` multiplies a row embedded at exit
# k by its run's scale k, so that early-exit rows rank fairly against full-depth rows in one inner-product index.
EXIT_SCALES = "exit_scales"


def _parse_exit_map(value, where: str, key: str, what: str, example: str, ok, rule: str) -> dict[int, float]:
    """Return {exit depth: number} from a JSON string or mapping under run.json / heads-metadata ``key``; {} for
    None or an empty value. Raises ValueError naming ``where`` when it is not such a map, or a depth is below 1 or
    a number fails ``ok`` (``rule`` says what it must be)."""
    if value is None or value == "" or value == {}:
        return {}
    try:
        raw = json.loads(value) if isinstance(value, str) else value
        if not isinstance(raw, dict):
            raise TypeError(f"expected a JSON object, got {type(raw).__name__}")
        out = {int(k): float(v) for k, v in raw.items()}
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {key} must map exit depths to {what}, like {example}; got {value!r} ({e})") from None
    bad = {k: v for k, v in out.items() if k < 1 or not math.isfinite(v) or not ok(v)}
    if bad:
        raise ValueError(f"{where}: {key} {value!r} has exit depths below 1 or {what} that are not {rule} ({bad}); "
                         f"retrain the heads with `icar train-exits`")
    return dict(sorted(out.items()))


def parse_exit_scales(value, where: str) -> dict[int, float]:
    """Return {exit depth: scale} from a JSON string or mapping ({"4": 1.02}); {} for None or an empty value.

    Raises ValueError naming ``where`` (the file it came from) when a depth is not a positive integer or a scale is
    not a positive finite number.
    """
    return _parse_exit_map(value, where, EXIT_SCALES, "scales", '{"4": 1.02}', lambda v: v > 0,
                           "positive finite numbers")


# Per-exit similarity offsets (issue #20): the exit-heads file's metadata key and run.json's field, JSON
# {"<exit depth>": offset}. With the scales they make an affine score calibration: an exit-k row scores
# scale_k * cosine + offset_k against a query, full-depth rows their cosine. A scale alone cannot match both the
# level and the spread of an exit's similarities to full depth's (measured: exit 4 of the demo stays over 1 point of
# mixed-gallery recall at every scale); the offset can. An inner-product index holds it in one extra dimension:
# `icar index` appends offset_k to each exit-k row (0 to full-depth rows) and 1 to each query.
EXIT_OFFSETS = "exit_offsets"


def parse_exit_offsets(value, where: str) -> dict[int, float]:
    """Return {exit depth: offset} from a JSON string or mapping ({"4": 0.1}); {} for None or an empty value.

    Raises ValueError naming ``where`` when a depth is not a positive integer or an offset is not a finite number
    in [-1, 1] (a cosine offset outside it would drown the similarity it calibrates).
    """
    return _parse_exit_map(value, where, EXIT_OFFSETS, "offsets", '{"4": 0.1}', lambda v: abs(v) <= 1,
                           "finite numbers in [-1, 1]")
