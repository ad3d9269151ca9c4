"""Which model an embed run uses and how it routes images: the model side of the embed job's configuration, and
the grammar of token-merging schedules (``r4``, ``keep0.8``) and profiles (``8@keep0.8``) that its ``merge``,
router files and run.json carry.

Its own module below ``embed`` so that the model stage (the worker, the scorer resolver) and the embed driver
share one definition without the model stage importing the Ray wiring; torch-free, so that the driver, the
router and the CLI parse schedules and profiles without loading torch. What a schedule does to the tokens is
``pipeline.model.merging``'s business.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass


@dataclass
class ModelSpec:
    """Which CLIP, which exits, how images are routed and scored."""

    model: str = "demo"  # open_clip model name (ViT-B-32, ViT-L-14, ...) or "demo" (shipped weights)
    pretrained: str | None = None  # open_clip tag, local checkpoint path, or "none" (seeded random init)
    seed: int = 0  # seed of the random init when pretrained is "none"
    exits: list[int] | None = None  # exit depths in blocks; None: the model's default (last = full depth)
    heads: str | None = None  # exit-heads safetensors; None: the demo's shipped heads, else the tower's own ln_post/proj
    router: str | None = None  # router JSON from `icar calibrate`; None: see route_fractions / exit_at / full_depth
    exit_at: int | None = None  # route every image to this depth (fixed-depth runs, baselines)
    full_depth: bool = False  # route every image to the last block (the open_clip baseline)
    route_fractions: list[float] | None = None  # fixed share of images per exit, by a hash of the key (benchmarks)
    scorer: str = "default"  # default | heuristic | convnext | none
    scorer_checkpoint: str | None = None  # ConvNeXt-IC checkpoint (safetensors) for --scorer convnext
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 where native, else fp32) | fp32 | bf16 | fp16; pipeline.runtime.resolve_precision
    torch_threads: int | None = None  # intra-op threads per CPU actor; None: CPUs per actor
    merge: str | None = None  # token-merging schedule (r2, keep0.8) for every image at exit_at or full depth: a one-profile router


# ------------------------------------------------------------------------------------------------ merge schedules

_SPEC = re.compile(r"^(?:r(?P<r>\d+)|keep(?P<keep>\d*\.?\d+))(?P<noprop>:noprop)?$")


@dataclass(frozen=True)
class MergeSchedule:
    """How many tokens each block merges: ``r`` per block, or a ``keep`` ratio of each block's mergeable tokens."""

    r: int | None = None  # tokens merged in every block (constant r)
    keep: float | None = None  # share of mergeable tokens each block keeps, in (0, 1]
    prop_attn: bool = True  # proportional attention: add log(size) to the attention logits

    def __post_init__(self):
        if (self.r is None) == (self.keep is None):
            raise ValueError("a merge schedule needs exactly one of r (tokens per block) or keep (ratio per block)")
        if self.r is not None and (not isinstance(self.r, int) or self.r < 0):
            raise ValueError(f"merge r must be a non-negative int (tokens merged per block), got {self.r!r}")
        if self.keep is not None and not 0.0 < float(self.keep) <= 1.0:
            raise ValueError(f"merge keep ratio must lie in (0, 1], got {self.keep!r}")

    @property
    def spec(self) -> str:
        """Return the short spec string (``r4``, ``keep0.8``, ``r4:noprop``) that ``parse_merge`` reads back."""
        base = f"r{self.r}" if self.r is not None else f"keep{float(self.keep):g}"
        return base if self.prop_attn else base + ":noprop"

    def __str__(self) -> str:
        return self.spec

    def merges(self, num_tokens: int, num_blocks: int) -> list[int]:
        """Return the tokens merged in each of ``num_blocks`` blocks for an input of ``num_tokens`` (class included)."""
        out, t = [], int(num_tokens)
        for _ in range(num_blocks):
            mergeable = t - 1  # the class token never merges
            want = self.r if self.r is not None else int(round((1.0 - float(self.keep)) * mergeable))
            r = max(0, min(int(want), mergeable // 2))  # bipartite matching halves at most
            out.append(r)
            t -= r
        return out

    def token_counts(self, num_tokens: int, num_blocks: int) -> list[int]:
        """Return [tokens entering block 1, ..., entering block n, leaving block n] (class token included)."""
        counts = [int(num_tokens)]
        for r in self.merges(num_tokens, num_blocks):
            counts.append(counts[-1] - r)
        return counts


def parse_merge(spec: str | MergeSchedule | None) -> MergeSchedule | None:
    """Return the MergeSchedule of ``spec`` (``r4``, ``keep0.8``, ``...:noprop``); ``none``/None/empty gives None."""
    if spec is None or isinstance(spec, MergeSchedule):
        return spec
    s = str(spec).strip().lower()
    if s in ("", "none", "off"):
        return None
    m = _SPEC.match(s)
    if not m:
        raise ValueError(f"merge schedule {spec!r} is not understood; write r<N> (merge N tokens per block, e.g. r4), "
                         "keep<RATIO> (each block keeps that share, e.g. keep0.8), optionally with ':noprop', or none")
    prop = m.group("noprop") is None
    if m.group("r") is not None:
        return MergeSchedule(r=int(m.group("r")), prop_attn=prop)
    return MergeSchedule(keep=float(m.group("keep")), prop_attn=prop)


def merge_spec(schedule: MergeSchedule | None) -> str:
    """Return the spec string of ``schedule`` ("none" for no merging)."""
    return schedule.spec if schedule is not None else "none"


# ------------------------------------------------------------------------------------------------ profiles

@dataclass(frozen=True)
class Profile:
    """What one image computes: its exit depth and the token-merging schedule on the way (None: no merging)."""

    exit: int
    merge: MergeSchedule | None = None

    @property
    def spec(self) -> str:
        """Return ``DEPTH`` or ``DEPTH@SCHEDULE`` (e.g. ``12``, ``12@keep0.8``), what router files and run.json carry."""
        return str(self.exit) if self.merge is None else f"{self.exit}@{self.merge.spec}"

    def __str__(self) -> str:
        return self.spec


def parse_profile(spec: str | Profile) -> Profile:
    """Return the Profile of ``DEPTH`` or ``DEPTH@SCHEDULE`` (``8``, ``8@r2``, ``6@keep0.8:noprop``)."""
    if isinstance(spec, Profile):
        return spec
    depth, _, merge = str(spec).strip().partition("@")
    try:
        exit_ = int(depth)
    except ValueError:
        raise ValueError(f"profile {spec!r} must be DEPTH or DEPTH@SCHEDULE, e.g. 8 or 8@keep0.8") from None
    if exit_ < 1:
        raise ValueError(f"profile {spec!r}: the exit depth must be a positive block count")
    return Profile(exit_, parse_merge(merge) if merge else None)


def parse_profiles(specs: str | list) -> list[Profile]:
    """Return the profiles of a comma-separated string or a list (``4,6,8@keep0.8,8``), unique, in given order."""
    items = [s for s in specs.split(",")] if isinstance(specs, str) else list(specs)
    out = [parse_profile(s) for s in items if str(s).strip()]
    if not out:
        raise ValueError("no profiles given; e.g. --profiles 4,6,8@keep0.8,8")
    if len({p.spec for p in out}) != len(out):
        raise ValueError(f"profiles must be unique, got {[p.spec for p in out]}")
    return out


# --------------------------------------------------------------------------------------------- confidence heads


def confidence_heads_file(recorded: str, router_file: str | None) -> str:
    """Return where a confidence router's heads file is: the path it records, else the file of that name beside the
    router file (a router moved together with its heads, e.g. the demo's shipped pair)."""
    if "://" in recorded or os.path.exists(recorded) or not router_file or "://" in router_file:
        return recorded
    beside = os.path.join(os.path.dirname(router_file), os.path.basename(recorded))
    return beside if os.path.exists(beside) else recorded
