"""The train and val splits as one process of a data-parallel group sees them.

The result does not depend on the number of processes N: every process reads the same input stream (cheap:
tar/Parquet parsing) but decodes only its share (pair i of the stream belongs to process i % N), and the shares
are gathered back in stream order, cut to the split's limit exactly where one process would have cut it.
A single process is the group of one (``distributed.Dist()``), where every collective is the identity.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from pipeline.training import distributed
from pipeline.training.distributed import Dist
from pipeline.training.exit_config import ExitTrainConfig, TrainExitsError
from pipeline.training.pairs import PairStats, decode_pixels, is_held_out, iter_raw_pairs, merge_stats
from pipeline.training.recall import caption_groups


@dataclass
class Assembly:
    """How the processes' shares of a split make it up: rows each keeps, and the order of the gathered rows."""

    keep: list[int]  # per process: how many of its rows (a prefix of its share) belong to the split
    order: torch.Tensor  # permutation of the gathered kept rows into stream order
    groups: torch.Tensor  # caption group per row, in stream order


class SplitReader:
    """Reads the splits of one exit-training run for this process: its share of each, and the whole when gathered.

    ``stats`` counts, per split, what this process read and decoded (the group's after ``merge_stats``).
    """

    def __init__(self, cfg: ExitTrainConfig, dist: Dist, device: str, image_size: int, train_pairs=None,
                 val_pairs=None):
        """``train_pairs``/``val_pairs``: optional callables returning a fresh iterator of (key, pixels, caption)
        each time, used instead of the shards named by cfg (tests, notebooks)."""
        self.cfg, self.dist, self.device, self.image_size = cfg, dist, device, image_size
        self.given = {"train": train_pairs, "val": val_pairs}
        self.stats = {"train": PairStats(), "val": PairStats()}

    def raw(self, split: str) -> Iterator[tuple[str, object, str]]:
        """Yield the split's (key, encoded image bytes or given pixels, caption), the same stream in every process."""
        cfg = self.cfg
        given = self.given[split]
        stats = self.stats[split]
        if given is not None:
            def counted():
                for item in given():
                    stats.read += 1
                    yield item
            return counted()
        if split == "val" and cfg.val_inputs:
            urls, keep = cfg.val_inputs, None
        else:
            urls = cfg.inputs
            if cfg.val_inputs or cfg.val_fraction == 0:
                keep = None
            else:
                keep = (lambda k: is_held_out(k, cfg.val_fraction)) if split == "val" \
                    else (lambda k: not is_held_out(k, cfg.val_fraction))
        if split == "val" and not cfg.val_inputs and cfg.val_fraction == 0:
            raise TrainExitsError("no validation data: give --val inputs or a --val-fraction above 0")
        return iter_raw_pairs(urls, cfg.storage_options, cfg.image_column, stats, keep)

    def limit(self, split: str) -> int | None:
        """Return the most pairs the split may use (--max-train / --max-val), None for all."""
        return self.cfg.max_train if split == "train" else self.cfg.max_val

    def share(self, split: str) -> Iterator[tuple[int, str, np.ndarray, str]]:
        """Yield (position in the split's stream, key, pixels, caption) for this process's share of the split.

        Pair i of the stream belongs to process i % world_size, which alone decodes it. Each process yields at
        most the split's limit of decoded pairs: enough, whatever the others' decode failures, for ``assemble``
        to keep exactly the first ``limit`` decodable pairs of the stream, as a single process would.
        """
        d, limit, stats = self.dist, self.limit(split), self.stats[split]
        if limit is not None and limit <= 0:
            return
        taken = 0
        for pos, (key, payload, caption) in enumerate(self.raw(split)):
            if pos % d.world_size != d.rank:
                continue
            pixels = decode_pixels(key, payload, self.image_size, stats)
            if pixels is None:
                continue
            yield pos, key, pixels, caption
            taken += 1
            if limit is not None and taken >= limit:
                return

    def assemble(self, positions: list[int], captions: list[str], limit: int | None) -> Assembly:
        """Return how the processes' shares (stream ``positions`` and ``captions`` here) make up the split."""
        d = self.dist
        sizes = distributed.gather_sizes(d, len(positions), self.device)
        pos = distributed.all_gather_rows(d, torch.tensor(positions, dtype=torch.int64, device=self.device),
                                          sizes).cpu()
        keep = list(sizes)
        if limit is not None and len(pos) > limit:
            cutoff = pos.sort().values[limit - 1]
            keep = [int((part <= cutoff).sum()) for part in pos.split(sizes)]  # each share is in stream order
            pos = torch.cat([part[:k] for part, k in zip(pos.split(sizes), keep)])
        order = torch.argsort(pos)
        gathered = [c for part in distributed.all_gather_objects(d, captions[:keep[d.rank]]) for c in part]
        ordered = [gathered[i] for i in order.tolist()]
        return Assembly(keep, order, torch.from_numpy(caption_groups(ordered)) if ordered
                        else torch.zeros(0, dtype=torch.int64))

    def gather(self, local: torch.Tensor, a: Assembly) -> torch.Tensor:
        """Return every process's kept rows of ``local`` in stream order, on the CPU."""
        rows = local[:a.keep[self.dist.rank]].to(self.device)
        return distributed.all_gather_rows(self.dist, rows, a.keep).cpu()[a.order]

    def merge_stats(self, split: str) -> None:
        """Replace the split's stats by those of the whole group (each process counted its own decoding)."""
        parts = distributed.all_gather_objects(self.dist, dataclasses.asdict(self.stats[split]))
        self.stats[split] = merge_stats(parts)
