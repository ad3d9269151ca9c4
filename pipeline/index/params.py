"""Index parameter policy: which FAISS index fits N vectors of dimension D in a memory budget, and why.

Pure functions only (no FAISS, no I/O), so every decision can be tested as a table and explained in
index.json. The rules follow the FAISS wiki ("Guidelines to choose an index") and what autofaiss does:

- exact search (``Flat``, inner product) while the corpus is small enough that scanning it is cheap;
- an inverted file (IVF) with about 4*sqrt(N) lists below 1M vectors, 65536 lists up to 10M, 262144 up to
  100M and 1048576 beyond, with an HNSW coarse quantizer once a flat scan over the centroids costs too much;
- k-means needs 39..256 training points per centroid: nlist is lowered until the training sample holds 39
  per list, and the sample holds ``train_points_per_list`` (default 64) per list where the data allows;
- scalar codes (8 or 4 bits per dimension) when the budget holds them: near-exact, and nothing to train
  but the lists; below that, product quantization (PQ) with the largest code that fits the memory budget
  (m bytes per vector at 8 bits, m dividing the dimension, at most dim/4); an index whose last dimension
  holds exit offsets takes the embeddings' code (m dividing dim - 1) and pads with OPQ;
- at that code, the variants are weighed by estimated recall per byte (``code_variants``): an OPQ rotation
  when each sub-quantizer encodes >= 8 dimensions (trained on a 32k subsample, 10 iterations), into fewer
  dimensions (at most 1/8 dropped) when that is what makes it fit; an HNSW32 coarse quantizer once a flat
  centroid scan costs >= 2**23 multiply-adds per query, where its graph fits;
- every phase's memory is estimated before any work starts; a budget that cannot hold the index is refused.

Sizes are 1024-based: "4G" = 4 * 2**30 bytes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

KIB = 1024
_UNITS = {"": 1, "B": 1, "K": KIB, "M": KIB**2, "G": KIB**3, "T": KIB**4, "P": KIB**5}

ID_BYTES = 8  # every IVF entry stores its int64 row id beside its code
LIST_OVERHEAD_BYTES = 64  # per inverted list: two std::vector headers plus allocator slack
HNSW_BYTES_PER_CENTROID = 400  # HNSW32 graph links (2*32 int32 on level 0 plus upper levels) and levels
GROWTH_SLACK = 1.5  # std::vector capacity doubling while lists grow during add/merge
PROCESS_BASE_BYTES = 256 * KIB**2  # the driver: python + numpy + pyarrow + faiss + Ray client (measured ~230 MB)
TASK_BASE_BYTES = 512 * KIB**2  # one Ray worker running an add task, before its data (measured ~450-500 MB)
ADD_BATCH_ROWS = 4096  # vectors an add task converts, assigns and encodes at once (pipeline.index.faiss_ops.add_group)
GT_QUERIES = 2000  # tuning queries (image + text) whose exact top-k an add task keeps (scores per batch)
PQ_TRAIN_POINTS = 65536  # FAISS trains each PQ sub-quantizer on at most 256 * 256 points
PQ_MIN_TRAIN_POINTS = 39 * 256  # below this FAISS warns that the 256-centroid PQ k-means is under-trained
# OPQ's rotation is trained on a subsample, few iterations: FAISS's defaults (65,536 points, 50 iterations) are what
# made autofaiss's OPQ64_448 build take 560 of its 596 s on 200k x 512 vectors (2 cores).
OPQ_TRAIN_POINTS = 32768
OPQ_ITERATIONS = 10
# An HNSW coarse quantizer only where a flat centroid scan costs >= 2**23 multiply-adds per query (16384 lists of
# 512 dims). Measured at 2048 lists (200k x 512, 3000 clusters, 2026-12-06): OPQ64_448,IVF2048_HNSW32,PQ64 reached
# recall@10 0.56 at nprobe 256 and 0.63 at all 2048 lists, against 0.73 at nprobe 256 with a flat quantizer: the
# graph's approximate assignment (efSearch 16 while adding) puts vectors in the wrong list, and their residual
# codes pay for it. autofaiss's own build of that factory: 0.55 at 256, 0.66 at 1024.
HNSW_MIN_CENTROID_SCAN = 2**23
OPQ_MIN_KEPT_DIMS = 7 / 8  # an OPQ rotation may drop at most 1/8 of the dimensions to make room (autofaiss: 448/512)


class BudgetError(ValueError):
    """The memory budget cannot hold the index (or its build): the message names the numbers and the fix."""


def parse_size(text: str | int) -> int:
    """Return the number of bytes in a human size: "4G", "512M", "1.5g", "100K", "4GiB", "4GB" or plain bytes.

    Units are 1024-based (K = 1024, M = 1024**2, G = 1024**3, T = 1024**4); "GB" and "GiB" mean the same as "G".
    """
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtTpP]?)(?:i?[bB])?\s*", str(text))
    if not m:
        raise ValueError(f"cannot read the size {text!r}: write a number with an optional unit K, M, G or T "
                         f"(1024-based), e.g. 4G or 512M")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def format_size(n: float) -> str:
    """Return ``n`` bytes as a short 1024-based string, e.g. "3.2G"."""
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1024 or unit == "T":
            return f"{n:.0f}B" if unit == "" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}T"


@dataclass
class IndexParams:
    """The chosen index and what it will cost; ``reasons`` says why, in words (recorded in index.json)."""

    factory: str  # faiss.index_factory string, e.g. "IVF1024,PQ64" (metric: inner product)
    kind: str  # "flat" (exact) | "pq" (PQ codes, no IVF) | "ivfpq" | "ivfsq" | "custom" (--factory we cannot parse)
    dim: int  # input dimension
    nlist: int = 0  # IVF lists (0: no IVF)
    coarse: str = ""  # IVF coarse quantizer: "flat" | "hnsw32" ("" without IVF)
    m: int = 0  # PQ sub-quantizers = code bytes per vector at 8 bits (0: no PQ)
    nbits: int = 8  # bits per PQ sub-code (SQ: bits per dimension)
    opq: bool = False  # an OPQ rotation precedes the IVF
    opq_dim: int = 0  # OPQ output dimension (= dim unless padded to a multiple of m or reduced to make room)
    opq_train_points: int = 0  # vectors of the sample the OPQ rotation is trained on (0: no OPQ)
    opq_iterations: int = 0  # OPQ's alternating iterations (rotation, then PQ codebooks)
    estimated_recall: float = 0.0  # the policy's recall@10 estimate at full nprobe (0: not estimated)
    candidates: list = field(default_factory=list)  # the code variants weighed: factory, bytes, estimated recall
    train_size: int = 0  # vectors sampled to train (0: no training)
    code_bytes: float = 0.0  # bytes of one vector's code
    bytes_per_vector: float = 0.0  # code + id bytes stored per vector
    estimated_bytes: int = 0  # index size in memory (and on disk) once built
    estimated_build_bytes: int = 0  # peak memory of the build on the driver (training / in-memory merge)
    estimated_task_bytes: int = 0  # peak memory of one add task
    build_phases: dict = field(default_factory=dict)  # phase -> estimated bytes (train, add, merge_memory)
    merge: str = "memory"  # "memory" (merge_from) | "disk" (OnDiskInvertedLists via merge_ondisk)
    reasons: list[str] = field(default_factory=list)  # the decisions, in words

    def to_dict(self) -> dict:
        """Return the parameters as a JSON-ready dict."""
        return dict(self.__dict__)


def _pow2_near(x: float) -> int:
    """Return the power of two nearest to ``x`` in log scale (at least 1)."""
    return 2 ** max(0, round(math.log2(max(x, 1.0))))


def _pow2_floor(x: float) -> int:
    """Return the largest power of two <= ``x`` (at least 1)."""
    return 2 ** max(0, int(math.floor(math.log2(max(x, 1.0)))))


def recommended_nlist(n: int) -> tuple[int, str]:
    """Return (nlist, why) from the FAISS wiki's table for ``n`` vectors."""
    if n < 1_000_000:
        nlist = _pow2_near(4 * math.sqrt(n))
        return nlist, f"nlist {nlist}: about 4*sqrt(N) = {4 * math.sqrt(n):.0f} lists for N < 1M (FAISS guideline)"
    if n < 10_000_000:
        return 65536, "nlist 65536 for 1M <= N < 10M (FAISS guideline)"
    if n < 100_000_000:
        return 262144, "nlist 262144 for 10M <= N < 100M (FAISS guideline)"
    return 1_048_576, "nlist 1048576 for N >= 100M (FAISS guideline)"


def min_code_bytes(dim: int) -> int:
    """Return the smallest PQ code we build for ``dim`` dimensions: 1 bit per 8 dims, at least 4 bytes.

    Below it, recall@10 collapses whatever nprobe is; refusing is more useful than building it.
    """
    return max(4, math.ceil(dim / 64))


def _divisors(dim: int) -> list[int]:
    return [d for d in range(1, dim + 1) if dim % d == 0]


def fixed_index_bytes(dim: int, nlist: int, coarse: str, m: int, nbits: int, opq_dim: int) -> int:
    """Return the index bytes that do not grow with N: centroids, HNSW graph, PQ codebooks, OPQ matrix, lists."""
    d = opq_dim or dim
    total = 0
    if nlist:
        total += nlist * d * 4 + nlist * LIST_OVERHEAD_BYTES
        if coarse == "hnsw32":
            total += nlist * HNSW_BYTES_PER_CENTROID
    if m:
        total += d * (2**nbits) * 4
    if opq_dim:
        total += dim * opq_dim * 4
    return total


def estimate_index_bytes(n: int, dim: int, nlist: int, coarse: str, m: int, nbits: int, opq_dim: int,
                         code_bytes: float | None = None) -> int:
    """Return the size of a built index holding ``n`` vectors."""
    if code_bytes is None:
        code_bytes = m * nbits / 8 if m else dim * 4
    per_vector = code_bytes + (ID_BYTES if nlist else 0)
    return int(n * per_vector + fixed_index_bytes(dim, nlist, coarse, m, nbits, opq_dim))


def parse_factory(factory: str, dim: int) -> dict:
    """Return what we can read from a factory string: kind, nlist, coarse, m, nbits, opq, opq_dim.

    Unknown pieces give kind "custom"; the caller then supplies the code size from an empty FAISS index.
    """
    out = {"kind": "custom", "nlist": 0, "coarse": "", "m": 0, "nbits": 8, "opq": False, "opq_dim": 0, "sq": 0}
    parts = [p.strip() for p in factory.split(",") if p.strip()]
    known = True
    for p in parts:
        if mo := re.fullmatch(r"OPQ(\d+)(?:_(\d+))?", p):
            out["opq"] = True
            out["opq_dim"] = int(mo.group(2) or dim)
        elif mo := re.fullmatch(r"IVF(\d+)(?:_HNSW(\d+))?", p):
            out["nlist"] = int(mo.group(1))
            out["coarse"] = "hnsw32" if mo.group(2) else "flat"
        elif mo := re.fullmatch(r"PQ(\d+)(?:x(\d+))?", p):
            out["m"] = int(mo.group(1))
            out["nbits"] = int(mo.group(2) or 8)
        elif mo := re.fullmatch(r"SQ(4|6|8|fp16)", p):
            out["sq"] = 16 if mo.group(1) == "fp16" else int(mo.group(1))
            out["nbits"] = out["sq"]
        elif p in ("Flat", "IDMap,Flat"):
            pass
        else:
            known = False
    if known:
        if out["sq"] and out["nlist"] and not out["m"]:
            out["kind"] = "ivfsq"
        elif out["m"] and out["nlist"]:
            out["kind"] = "ivfpq"
        elif out["m"]:
            out["kind"] = "pq"
        elif parts == ["Flat"]:
            out["kind"] = "flat"
        else:
            known = False
    if not known:
        out["kind"] = "custom"
    return out


# Recall model of a PQ code (recall@10 at full nprobe, 1 - miss): the miss halves for every 1/RECALL_SLOPE more
# code bits per input dimension; an OPQ rotation acts like OPQ_BIT_GAIN times the bits. Calibrated on 200k x 512
# clustered unit vectors (bench/index.py, 3000 clusters, 2026-12-06): at nprobe 256 of 2048 lists PQ64 (1 bit/dim)
# 0.713, OPQ64 0.728, OPQ64_448 0.727, still rising with nprobe; 200 clusters: PQ128 0.85. These synthetic vectors
# spread their variance evenly over the dimensions, where a rotation has little to balance: real embeddings are
# less even, so the measured +0.015 is the rotation's floor here, not its typical gain.
RECALL_MISS_AT_1BIT = 0.27
RECALL_SLOPE = 0.8
OPQ_BIT_GAIN = 1.15


def estimated_recall(dim: int, m: int, nbits: int = 8, opq: bool = False) -> float:
    """Return the recall model's recall@10 at full nprobe for an m x nbits PQ code of ``dim`` input dimensions.

    A ranking aid, not a promise: it orders code variants of one budget; tuning measures the real recall.
    """
    bits = m * nbits / dim * (OPQ_BIT_GAIN if opq else 1.0)
    return round(max(0.0, min(1.0, 1 - RECALL_MISS_AT_1BIT * 2 ** (-RECALL_SLOPE * (bits - 1)))), 3)


@dataclass
class CodeVariant:
    """One way to spend a budget at a given PQ code: rotation (OPQ) and coarse quantizer, its size and recall."""

    factory: str  # e.g. "OPQ64_448,IVF2048_HNSW32,PQ64"
    opq_dim: int  # 0: no rotation
    coarse: str  # "flat" | "hnsw32" | "" (no IVF)
    estimated_bytes: int
    recall: float  # estimated_recall(...)
    fits: bool

    def to_dict(self) -> dict:
        """Return the variant as a JSON-ready dict."""
        return dict(self.__dict__)


def _variant_factory(dim: int, nlist: int, coarse: str, m: int, opq_dim: int) -> str:
    opq_part = (f"OPQ{m}," if opq_dim == dim else f"OPQ{m}_{opq_dim},") if opq_dim else ""
    if not nlist:
        return f"{opq_part}PQ{m}"
    return f"{opq_part}IVF{nlist}{'_HNSW32' if coarse == 'hnsw32' else ''},PQ{m}"


def code_variants(n: int, dim: int, nlist: int, coarse: str, m: int, pad_dim: int, max_index_bytes: int,
                  opq_min_dsub: int) -> list[CodeVariant]:
    """Return the variants of a PQ``m`` index, best first: those that fit, by estimated recall (to 0.01), then
    with an HNSW coarse quantizer (faster queries and adds), then fewest bytes; those that do not fit follow.

    Rotations weighed: none; OPQ into ``dim`` when each sub-quantizer encodes >= ``opq_min_dsub`` dims; when that
    does not fit, OPQ into the largest multiple of m that does, dropping at most 1/8 of the dimensions (as
    autofaiss's OPQ64_448 does); ``pad_dim`` (no m divides dim, or m divides the embeddings' dim - 1 beside an
    exit offset dimension) forces OPQ into that padded dimension. Coarse quantizers: ``coarse`` as given when it
    is "hnsw32" (nlist too large for a flat scan) or ""; else flat and, once a flat centroid scan costs
    HNSW_MIN_CENTROID_SCAN multiply-adds, HNSW32.
    """
    if coarse == "flat" and nlist * dim >= HNSW_MIN_CENTROID_SCAN:
        coarses = ["flat", "hnsw32"]
    else:
        coarses = [coarse]
    out: list[CodeVariant] = []
    for c in coarses:
        dims = [pad_dim] if pad_dim else [0] + ([dim] if dim // m >= opq_min_dsub else [])
        for d in dims:
            size = estimate_index_bytes(n, dim, nlist, c, m, 8, d)
            out.append(CodeVariant(_variant_factory(dim, nlist, c, m, d), d, c, size,
                                   estimated_recall(dim, m, 8, bool(d)), size <= max_index_bytes))
        if dims[-1] == dim and not out[-1].fits:
            d = dim - m
            while d >= dim * OPQ_MIN_KEPT_DIMS:
                size = estimate_index_bytes(n, dim, nlist, c, m, 8, d)
                if size <= max_index_bytes:
                    out.append(CodeVariant(_variant_factory(dim, nlist, c, m, d), d, c, size,
                                           estimated_recall(dim, m, 8, True), True))
                    break
                d -= m
    out.sort(key=lambda v: (not v.fits, -round(v.recall, 2), v.coarse != "hnsw32", v.estimated_bytes))
    return out


def explain_variants(variants: list[CodeVariant], dim: int, m: int, opq_min_dsub: int, budget: str) -> list[str]:
    """Return the reasons for the first (chosen) variant, naming the others weighed."""
    best = variants[0]
    lines = [f"weighed at PQ{m} within {budget} (estimated recall@10 at full nprobe; size): "
             + "; ".join(f"{v.factory} {v.recall:.2f}, {format_size(v.estimated_bytes)}"
                         + ("" if v.fits else " (does not fit)") for v in variants)
             + f" -> {best.factory}: the highest estimated recall, then an HNSW coarse quantizer, then the fewest "
               f"bytes"]
    dsub = dim / m
    plain = next((v for v in variants if not v.opq_dim and v.coarse == best.coarse), None)
    if best.opq_dim and plain is not None:
        lines.append(f"OPQ{m}: each sub-quantizer encodes {dsub:g} dims (>= {opq_min_dsub}); a learned rotation "
                     f"balances the variance across sub-vectors: estimated recall {best.recall:.2f} vs "
                     f"{plain.recall:.2f} without, for {format_size(best.estimated_bytes - plain.estimated_bytes)} "
                     f"more (the rotation matrix" + (", less the smaller centroids and codebooks)"
                                                     if best.opq_dim < dim else ")"))
    elif not best.opq_dim and dsub < opq_min_dsub:
        lines.append(f"no OPQ: each sub-quantizer encodes {dsub:g} dims (< {opq_min_dsub}); a rotation gains "
                     f"little at {8 * m / dim:g} code bits per dimension")
    if best.opq_dim and best.opq_dim < dim and plain is not None:
        lines.append(f"OPQ output {best.opq_dim} dims: the rotation keeps the {best.opq_dim} of {dim} directions "
                     f"that encode best, shrinking centroids and codebooks so that OPQ"
                     + (" and the HNSW graph fit" if best.coarse == "hnsw32" else " fits"))
    flat_twin = any(v.coarse == "flat" for v in variants) and any(v.coarse == "hnsw32" for v in variants)
    if flat_twin and best.coarse == "hnsw32":
        lines.append(f"HNSW32 coarse quantizer: a flat scan of the centroids costs {HNSW_MIN_CENTROID_SCAN:,}+ "
                     f"multiply-adds per query and per added vector, more than the probed lists' codes; its graph "
                     f"fits the budget")
    elif flat_twin:
        lines.append("flat coarse quantizer: an HNSW32 graph over the centroids would cost recall or not fit "
                     "beside the chosen code")
    return lines


def _build_estimates(n: int, dim: int, p: IndexParams, workers: int, shard_rows: int,
                     group_vectors: int) -> dict[str, int]:
    """Return estimated peak bytes per build phase (driver: train, merge; each add task: add)."""
    d = p.opq_dim or dim
    fixed = fixed_index_bytes(dim, p.nlist, p.coarse, p.m, p.nbits, p.opq_dim)
    phases: dict[str, int] = {}
    if p.train_size:
        # The float32 sample (plus the float16 copy it arrives as) and its rotated copy (OPQ), k-means'
        # assignment buffers (id + distance per point), PQ's subsample and its residuals (FAISS trains PQ on
        # at most 65536 points) and the index under training.
        copies = 1.5 + (1 if p.opq else 0)
        phases["train"] = int(PROCESS_BASE_BYTES + p.train_size * d * 4 * copies + p.train_size * 12
                              + 2 * min(p.train_size, PQ_TRAIN_POINTS) * d * 4 + fixed)
    # One add task: the trained index, one shard row group as float16, one batch as float32 with its residuals
    # (and rotated copy), the exact scores of the tuning queries against it, and its partial index growing
    # with capacity doubling.
    batch = shard_rows * dim * 2 + ADD_BATCH_ROWS * (dim * 4 * (2 + (1 if p.opq else 0)) + GT_QUERIES * 4 * 3)
    task = int(TASK_BASE_BYTES + 2 * fixed + batch + group_vectors * p.bytes_per_vector * GROWTH_SLACK)
    phases["add_task"] = task
    phases["add_all_tasks"] = task * max(1, workers) + PROCESS_BASE_BYTES  # tasks beside the driver
    # In-memory merge: the growing final index plus the one partial being moved into it.
    phases["merge_memory"] = int(PROCESS_BASE_BYTES + p.estimated_bytes * GROWTH_SLACK
                                 + group_vectors * p.bytes_per_vector)
    return phases


def choose_index_params(
    n: int,
    dim: int,
    max_index_bytes: int,
    max_build_bytes: int | None = None,
    factory: str | None = None,
    code_bytes: float | None = None,
    workers: int = 1,
    shard_rows: int = 10_000,
    flat_below: int = 50_000,
    train_points_per_list: int = 64,
    max_train_points: int | None = None,
    opq_min_dsub: int = 8,
    hnsw_from_nlist: int = 16384,
    merge: str = "auto",
    scalar_codes: bool = True,
    offset_dim: bool = False,
) -> IndexParams:
    """Return the index to build for ``n`` vectors of dimension ``dim`` within the memory budgets.

    ``max_index_bytes``: the built index (what a search server holds). ``max_build_bytes``: peak memory of
    the build (driver: training sample, in-memory merge; add tasks times ``workers`` on one machine);
    None means unbounded. ``merge``: "auto" (in memory unless the build budget cannot hold it), "memory" or
    "disk" (inverted lists in an .ivfdata file; IVF only). ``factory`` overrides the choice (``code_bytes`` then gives its code size when
    the string is not one we can parse). ``shard_rows``: the largest shard, read whole by an add task.
    ``offset_dim``: the last dimension holds exit offsets (``RunPlan.offset_column``): choose the PQ code size m
    as for ``dim - 1``, the embeddings' dimension, and pad with OPQ into ``m * ceil(dim / m)``, so that the
    extra dimension does not shrink the code (513 = 27 x 19 would get PQ57 where 512 gets PQ64: OPQ64_576
    instead). A code of ``dim`` itself stays where it is the larger one that fits (the padding costs a rotation
    matrix and wider centroids: a budget that just holds PQ32 of 512 dims keeps PQ27 of 513).
    Raises BudgetError when the budget cannot hold the index, naming the numbers and what to change.
    """
    if n <= 0:
        raise ValueError("there are no vectors to index: the runs' manifests list no rows")
    if dim <= 0:
        raise ValueError(f"invalid dimension {dim}")
    reasons: list[str] = []
    budget = f"--max-index-memory {format_size(max_index_bytes)}"
    if factory:
        p = _params_from_factory(factory, n, dim, code_bytes, train_points_per_list, max_train_points, reasons)
    else:
        p = _choose_auto(n, dim, max_index_bytes, max_build_bytes, train_points_per_list, max_train_points,
                         flat_below, opq_min_dsub, hnsw_from_nlist, scalar_codes, offset_dim, reasons)
    if p.estimated_bytes > max_index_bytes:
        hint = ("pick a smaller code in --factory" if factory else
                f"raise it to at least {format_size(p.estimated_bytes * 1.05)}")
        raise BudgetError(
            f"the index {p.factory} for {n:,} vectors of dimension {dim} needs about "
            f"{format_size(p.estimated_bytes)} ({p.bytes_per_vector:.0f} bytes/vector + "
            f"{format_size(p.estimated_bytes - n * p.bytes_per_vector)} fixed), more than {budget}: {hint}")
    reasons.append(f"estimated index size {format_size(p.estimated_bytes)} "
                   f"({p.bytes_per_vector:g} bytes/vector) within {budget}")
    _plan_build(p, n, dim, max_build_bytes, workers, shard_rows, merge, reasons)
    p.reasons = reasons
    return p


def _train_size(n: int, nlist: int, m: int, per_list: int, cap: int | None) -> int:
    """Return the training sample size: per_list points per IVF list, enough for PQ, at most N and the cap."""
    want = max(per_list * nlist, PQ_TRAIN_POINTS if m else 0)
    if cap:
        want = min(want, cap)
    return int(min(n, want))


def _choose_auto(n, dim, max_index_bytes, max_build_bytes, per_list, max_train_points, flat_below,
                 opq_min_dsub, hnsw_from_nlist, scalar_codes, offset_dim, reasons) -> IndexParams:
    flat_bytes = n * dim * 4
    if n < flat_below and flat_bytes <= max_index_bytes:
        reasons.append(f"Flat (exact inner product): N = {n:,} < {flat_below:,}, where a full scan costs little "
                       f"and IVF lists would be too small to pay; {format_size(flat_bytes)} fits the budget")
        return IndexParams(factory="Flat", kind="flat", dim=dim, code_bytes=dim * 4, bytes_per_vector=dim * 4,
                           estimated_bytes=flat_bytes)
    if n < flat_below:
        reasons.append(f"Flat would need {format_size(flat_bytes)}, more than the index budget: compressing")

    # Training points that fit the build budget as float32 (an OPQ-rotated copy is accounted for below).
    cap = max_train_points
    if max_build_bytes:
        fit = max(0, int((max_build_bytes - PROCESS_BASE_BYTES) * 0.8 / (dim * 6 + 12)))
        cap = min(cap, fit) if cap else fit
    trainable = min(n, cap) if cap else n

    nlist, why = recommended_nlist(n)
    reasons.append(why)
    if 39 * nlist > trainable:
        lowered = _pow2_floor(trainable / 39)
        limit = "N" if trainable == n else "the training sample the build budget holds"
        reasons.append(f"nlist lowered to {lowered}: k-means needs >= 39 training points per list and "
                       f"{limit} is {trainable:,}")
        nlist = lowered
    if nlist < 16:
        # Too few vectors for a useful IVF: PQ codes alone (still compressed, scanned in full).
        nlist = 0
    coarse = ""
    if nlist:
        coarse = "hnsw32" if nlist >= hnsw_from_nlist else "flat"
        if coarse == "hnsw32":
            reasons.append(f"HNSW32 coarse quantizer: with {nlist} lists a flat scan of the centroids costs "
                           f"{nlist * dim:,} multiply-adds per query and per added vector")

    # Code size: the largest code the budget leaves after ids and fixed structures.
    fixed_guess = fixed_index_bytes(dim, nlist, coarse, 1, 8, 0)
    per_vector_budget = (max_index_bytes - fixed_guess) / n - (ID_BYTES if nlist else 0)
    if nlist and scalar_codes:
        sq = _scalar_choice(n, dim, nlist, coarse, per_vector_budget, max_index_bytes, per_list, cap, reasons)
        if sq is not None:
            return sq
    if trainable < PQ_MIN_TRAIN_POINTS:
        raise BudgetError(
            f"{n:,} vectors are too few to train PQ codes (>= {PQ_MIN_TRAIN_POINTS:,} needed), and neither exact "
            f"search (Flat, {format_size(flat_bytes)}) nor 4-bit scalar codes fit --max-index-memory "
            f"{format_size(max_index_bytes)}: raise it to at least {format_size(flat_bytes * 1.05)}"
            + ("" if trainable == n else " or raise --max-build-memory so more vectors can be sampled"))
    m_cap = max(1, dim // 4)
    m_min = min_code_bytes(dim)
    if per_vector_budget < m_min:
        raise BudgetError(
            f"{n:,} vectors of dimension {dim} in --max-index-memory {format_size(max_index_bytes)} leave "
            f"{max(per_vector_budget, 0):.1f} bytes per vector for codes after ids ({ID_BYTES if nlist else 0} "
            f"bytes) and fixed structures ({format_size(fixed_guess)}); the smallest useful code is {m_min} "
            f"bytes. Raise --max-index-memory to at least "
            f"{format_size(n * (m_min + (ID_BYTES if nlist else 0)) + fixed_guess)} or index fewer vectors")
    target = min(int(per_vector_budget), m_cap)
    # The code size first: the largest m dividing dim whose plain PQ code fits; for a dimension no such m
    # divides, OPQ into a padded one. The rotation and the coarse quantizer are weighed afterwards, at that m.
    options: list[tuple[int, int]] = [(d, 0) for d in sorted((d for d in _divisors(dim) if m_min <= d <= target),
                                                             reverse=True)]
    padded = not options
    if padded:
        for c in range(target, m_min - 1, -1):
            if c % 4 == 0 or c == m_min:
                options.append((c, c * math.ceil(dim / c)))
    # Exit offsets in the last dimension: the embeddings' codes (m dividing dim - 1, as dim - 1 would get them)
    # join, OPQ padding them into a multiple of m; the largest code that fits wins, so dim's own (e.g. PQ27 of
    # 513 = 27 x 19) only where it is larger or the padding's fixed bytes (rotation, wider centroids) do not fit.
    embedded = [(d, d * math.ceil(dim / d)) for d in _divisors(dim - 1)
                if offset_dim and min_code_bytes(dim - 1) <= d <= min(target, (dim - 1) // 4)]
    if embedded:
        options = sorted(set(options + embedded), key=lambda o: (-o[0], o[1]))
    m = pad_dim = 0
    for m, pad_dim in options:
        if estimate_index_bytes(n, dim, nlist, coarse, m, 8, pad_dim) <= max_index_bytes:
            break
    else:
        need = estimate_index_bytes(n, dim, nlist, coarse, m_min, 8, 0)
        raise BudgetError(
            f"{n:,} vectors of dimension {dim} do not fit --max-index-memory {format_size(max_index_bytes)} with "
            f"the smallest useful code ({m_min} bytes + {ID_BYTES if nlist else 0} id bytes per vector and "
            f"{format_size(fixed_guess)} fixed): raise it to at least {format_size(need * 1.05)}")
    code_dim = dim - 1 if (m, pad_dim) in embedded else dim
    if code_dim < dim:
        reasons.append(f"the last of {dim} dimensions holds exit offsets: PQ{m} as for the embeddings' {code_dim}, "
                       f"OPQ rotates into {pad_dim}")
    elif embedded:
        reasons.append(f"the last of {dim} dimensions holds exit offsets, but no code of the embeddings' {dim - 1} "
                       f"as large as PQ{m} fits once OPQ pads it: PQ{m} as for {dim} dimensions")
    if padded and code_dim == dim:
        reasons.append(f"PQ{m} with OPQ{m}_{pad_dim}: no divisor of dim {dim} lies in [{m_min}, {target}], so OPQ "
                       f"rotates into {pad_dim} dims, a multiple of {m}")
    elif int(per_vector_budget) > m_cap:
        reasons.append(f"PQ{m}: the budget allows {per_vector_budget:.0f} code bytes/vector; PQ codes stop at "
                       f"dim/4 = {m_cap} bytes (smaller sub-vectors train slowly and gain little)")
    else:
        reasons.append(f"PQ{m}: the largest code dividing dim {code_dim} that fits the budget "
                       f"({per_vector_budget:.0f} code bytes/vector before fixed structures)")
    variants = code_variants(n, dim, nlist, coarse, m, pad_dim, max_index_bytes, opq_min_dsub)
    best = variants[0]
    opq_dim, coarse, estimated = best.opq_dim, best.coarse, best.estimated_bytes
    reasons.extend(explain_variants(variants, dim, m, opq_min_dsub, format_size(max_index_bytes)))
    opq = opq_dim > 0
    opq_part = (f"OPQ{m}," if opq_dim == dim else f"OPQ{m}_{opq_dim},") if opq else ""
    if nlist:
        coarse_part = f"IVF{nlist}_HNSW32" if coarse == "hnsw32" else f"IVF{nlist}"
        factory = f"{opq_part}{coarse_part},PQ{m}"
        kind = "ivfpq"
    else:
        factory = f"{opq_part}PQ{m}"
        kind = "pq"
        reasons.append(f"no IVF: {trainable:,} trainable vectors are too few for >= 16 lists of >= 39 points "
                       f"beside a {PQ_MIN_TRAIN_POINTS:,}-point PQ training set")
    if opq and max_build_bytes and nlist:
        # OPQ rotates the whole sample: a second float32 copy, so fewer points fit the build budget.
        cap = min(cap, max(0, int((max_build_bytes - PROCESS_BASE_BYTES) * 0.8 / ((dim * 1.5 + opq_dim) * 4 + 12))))
        if 39 * nlist > cap:
            lowered = _pow2_floor(cap / 39)
            reasons.append(f"nlist lowered to {lowered}: with OPQ's rotated copy the build budget holds "
                           f"{cap:,} training points, and k-means needs >= 39 per list")
            nlist = lowered
            if nlist >= hnsw_from_nlist:
                coarse = "hnsw32"
            elif coarse == "hnsw32" and nlist * opq_dim < HNSW_MIN_CENTROID_SCAN:
                coarse = "flat"
            coarse_part = f"IVF{nlist}_HNSW32" if coarse == "hnsw32" else f"IVF{nlist}"
            factory = f"{opq_part}{coarse_part},PQ{m}"
            estimated = estimate_index_bytes(n, dim, nlist, coarse, m, 8, opq_dim)
    train = _train_size(n, nlist, m, per_list, cap)
    p = IndexParams(factory=factory, kind=kind, dim=dim, nlist=nlist, coarse=coarse, m=m, nbits=8, opq=opq,
                    opq_dim=opq_dim if opq else 0, train_size=train, code_bytes=float(m),
                    bytes_per_vector=float(m + (ID_BYTES if nlist else 0)), estimated_bytes=estimated,
                    estimated_recall=best.recall, candidates=[v.to_dict() for v in variants])
    if opq:
        p.opq_train_points = min(train, OPQ_TRAIN_POINTS)
        p.opq_iterations = OPQ_ITERATIONS
        reasons.append(f"OPQ rotation trained on {p.opq_train_points:,} of the sample's vectors, {OPQ_ITERATIONS} "
                       f"iterations (FAISS's default 65,536 x 50 is most of autofaiss's build time)")
    reasons.append("metric inner product: embeddings are L2-normalised, so inner product = cosine")
    reasons.append(f"training sample {train:,} vectors ({per_list} per list"
                   + (f", at least {PQ_TRAIN_POINTS:,} for PQ" if m else "") + ", capped by N and the build budget)")
    return p


def _scalar_choice(n, dim, nlist, coarse, per_vector_budget, max_index_bytes, per_list, cap,
                   reasons) -> IndexParams | None:
    """Return IVF + scalar-quantizer parameters when the budget holds >= 4 bits per dimension, else None.

    Scalar codes need no codebook training (a min/max per dimension) and keep recall near exact: on 200k
    clustered 512-d vectors, recall@10 at full nprobe was 0.996 (SQ8), 0.94 (SQ4) vs 0.85 for PQ128.
    """
    for bits in (8, 4):
        code = dim * bits / 8
        if per_vector_budget < code:
            continue
        estimated = estimate_index_bytes(n, dim, nlist, coarse, 0, 8, 0, code_bytes=code) + 2 * dim * 4
        if estimated > max_index_bytes:
            continue
        coarse_part = f"IVF{nlist}_HNSW32" if coarse == "hnsw32" else f"IVF{nlist}"
        train = _train_size(n, nlist, 0, per_list, cap)
        reasons.append(f"SQ{bits}: the budget holds {per_vector_budget:.0f} code bytes/vector, enough for {bits}-bit "
                       f"scalar quantization of every dimension ({code:g} bytes): near-exact scores and no "
                       f"codebook to train, better than any PQ code")
        reasons.append("metric inner product: embeddings are L2-normalised, so inner product = cosine")
        reasons.append(f"training sample {train:,} vectors ({per_list} per list, capped by N and the build budget)")
        return IndexParams(factory=f"{coarse_part},SQ{bits}", kind="ivfsq", dim=dim, nlist=nlist, coarse=coarse,
                           nbits=bits, train_size=train, code_bytes=float(code),
                           bytes_per_vector=float(code + ID_BYTES), estimated_bytes=estimated)
    return None


def _params_from_factory(factory, n, dim, code_bytes, per_list, max_train_points, reasons) -> IndexParams:
    info = parse_factory(factory, dim)
    reasons.append(f"--factory {factory} given: parameters not chosen automatically")
    kind, nlist, m, nbits = info["kind"], info["nlist"], info["m"], info["nbits"]
    opq_dim = info["opq_dim"] if info["opq"] else 0
    if code_bytes is None:
        if kind == "custom":
            raise ValueError(f"cannot estimate the size of --factory {factory!r}: pass its code size "
                             f"(bytes/vector) from an empty index (sa_code_size)")
        code_bytes = m * nbits / 8 if m else (dim * info["sq"] / 8 if info["sq"] else dim * 4)
    ivf = nlist > 0 or "IVF" in factory
    if info["kind"] == "custom" and "IVF" in factory and not nlist:
        mo = re.search(r"IVF(\d+)", factory)
        nlist = int(mo.group(1)) if mo else 0
    if nlist and 39 * nlist > n:
        raise BudgetError(f"--factory {factory}: {nlist} lists need >= {39 * nlist:,} training vectors "
                          f"(39 per list) and the runs hold {n:,}: use fewer lists (IVF{_pow2_floor(n / 39)})")
    needs_train = ivf or m > 0 or "SQ" in factory or info["opq"] or kind == "custom"
    train = _train_size(n, nlist, m, per_list, max_train_points) if needs_train and kind != "flat" else 0
    per_vector = code_bytes + (ID_BYTES if ivf else 0)
    estimated = estimate_index_bytes(n, dim, nlist, info["coarse"], m, nbits, opq_dim, code_bytes=code_bytes)
    p = IndexParams(factory=factory, kind=kind, dim=dim, nlist=nlist, coarse=info["coarse"], m=m, nbits=nbits,
                    opq=info["opq"], opq_dim=opq_dim, train_size=train, code_bytes=float(code_bytes),
                    bytes_per_vector=float(per_vector), estimated_bytes=estimated)
    if info["opq"] and train:
        # The same short OPQ training as the automatic choice: FAISS's defaults cost minutes for little recall.
        p.opq_train_points, p.opq_iterations = min(train, OPQ_TRAIN_POINTS), OPQ_ITERATIONS
    return p


def _plan_build(p: IndexParams, n: int, dim: int, max_build_bytes: int | None, workers: int, shard_rows: int,
                merge: str, reasons: list[str]) -> None:
    """Fill in the build estimates and the merge mode; raise BudgetError when the build cannot fit."""
    if merge not in ("auto", "memory", "disk"):
        raise ValueError(f"merge must be auto, memory or disk, not {merge!r}")
    group_vectors = math.ceil(n / max(1, workers))
    phases = _build_estimates(n, dim, p, workers, shard_rows, group_vectors)
    p.merge = "memory"
    if merge == "disk":
        if not p.nlist:
            raise ValueError(f"--merge-partials disk needs inverted lists (an IVF index); {p.factory} has none")
        p.merge = "disk"
        reasons.append("on-disk merge (--merge-partials disk): inverted lists in an .ivfdata file beside index.faiss")
    elif merge == "memory":
        reasons.append("in-memory merge (--merge-partials memory)")
    elif max_build_bytes is not None and phases["merge_memory"] > max_build_bytes:
        if p.nlist:
            p.merge = "disk"
            reasons.append(f"on-disk merge: the in-memory merge needs about {format_size(phases['merge_memory'])}, "
                           f"more than --max-build-memory {format_size(max_build_bytes)}; partial indexes are "
                           f"merged into an .ivfdata file beside index.faiss")
        else:
            raise BudgetError(f"{p.factory} has no inverted lists to merge on disk and needs "
                              f"{format_size(phases['merge_memory'])} to merge in memory, more than "
                              f"--max-build-memory {format_size(max_build_bytes)}: raise it")
    driver = max(phases.get("train", 0), phases["merge_memory"] if p.merge == "memory" else 0)
    p.build_phases = phases
    p.estimated_build_bytes = int(driver)
    p.estimated_task_bytes = phases["add_task"]
    if max_build_bytes is None:
        return
    if phases.get("train", 0) > max_build_bytes:
        raise BudgetError(
            f"training {p.factory} on {p.train_size:,} vectors of dimension {dim} needs about "
            f"{format_size(phases['train'])}, more than --max-build-memory {format_size(max_build_bytes)}: raise it "
            f"or choose fewer IVF lists with --factory")
    if phases["add_all_tasks"] > max_build_bytes:
        # More, smaller groups keep each task's partial index small; only the shard batch is irreducible.
        floor_task = _build_estimates(n, dim, p, 1, shard_rows, 0)["add_task"]
        if floor_task * max(1, workers) > max_build_bytes:
            raise BudgetError(
                f"{workers} add task(s) each holding the trained index ({format_size(floor_task)} with one shard "
                f"of {shard_rows:,} rows) need {format_size(floor_task * workers)}, more than --max-build-memory "
                f"{format_size(max_build_bytes)}: use fewer --add-tasks or raise --max-build-memory")
    reasons.append(f"estimated build peak {format_size(p.estimated_build_bytes)} on the driver and "
                   f"{format_size(p.estimated_task_bytes)} per add task x {workers} within --max-build-memory "
                   f"{format_size(max_build_bytes)}")


def max_group_vectors(p: IndexParams, dim: int, max_build_bytes: int | None, workers: int, shard_rows: int) -> int | None:
    """Return the most vectors one add task may hold in its partial index under the build budget (None: any)."""
    if max_build_bytes is None or p.bytes_per_vector <= 0:
        return None
    floor_task = _build_estimates(0, dim, p, 1, shard_rows, 0)["add_task"]
    spare = max_build_bytes / max(1, workers) - floor_task
    return max(shard_rows, int(spare / (p.bytes_per_vector * GROWTH_SLACK)))


def group_shards(rows: list[int], groups: int, max_vectors: int | None = None) -> list[list[int]]:
    """Return contiguous groups of shard indices: at most ``groups`` groups of about equal rows, then split
    further so that no group holds more than ``max_vectors`` rows (a single larger shard stays whole).

    Contiguity keeps each group's row ids consecutive, so partial indexes merge back in shard order.
    """
    if not rows:
        return []
    total = sum(rows)
    groups = max(1, min(groups, len(rows)))
    out: list[list[int]] = [[] for _ in range(groups)]
    before = 0
    for i, r in enumerate(rows):
        # A shard belongs to the group its midpoint falls in: balanced, contiguous, never more than `groups`.
        g = min(groups - 1, int((before + r / 2) * groups / total)) if total else i * groups // len(rows)
        out[g].append(i)
        before += r
    out = [g for g in out if g]
    if not max_vectors:
        return out
    split: list[list[int]] = []
    for g in out:
        current: list[int] = []
        filled = 0
        for i in g:
            if current and filled + rows[i] > max_vectors:
                split.append(current)
                current, filled = [], 0
            current.append(i)
            filled += rows[i]
        split.append(current)
    return split


def nprobe_candidates(nlist: int, max_nprobe: int = 4096) -> list[int]:
    """Return the nprobe values to try in order: powers of two up to min(nlist, max_nprobe), and nlist itself."""
    top = min(nlist, max_nprobe)
    out, p = [], 1
    while p < top:
        out.append(p)
        p *= 2
    out.append(top)
    return out
