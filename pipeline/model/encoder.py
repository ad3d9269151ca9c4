"""Adaptive-depth CLIP image encoder: each image runs only as many transformer blocks as its exit depth.

One forward pass per batch runs open_clip's ViT blocks in order on the whole batch. After each exit depth
the rows routed there leave through that exit's head and only the rest go on: no block is computed twice,
and no image computes a block past its exit. The rows are sorted by exit depth first (deepest first), so the
images leaving at a depth are always the tail of the batch and what continues is a contiguous slice, not a
copy. The last depth is the unmodified tower (``ln_post``, pooling and ``proj`` of open_clip), so full-depth
embeddings equal ``model.encode_image``.

An exit head is LayerNorm + projection into the joint space, initialised from the tower's own
``ln_post``/``proj`` and trained by ``icar train-exits`` (pipeline/training/exits.py). Early exits pool the
CLASS token (pool_type 'tok') or the mean of the patch tokens (pool_type 'avg') exactly as the tower does
at full depth. (The paper's released code used open_clip's ``forward_intermediates``, which drops the class
token, and so pooled the top-left patch token instead.)
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Iterable

import torch
import torch.nn.functional as F
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from pipeline.io.schema import EXIT_OFFSETS, EXIT_SCALES, model_key, parse_exit_offsets, parse_exit_scales
from pipeline.io.storage import atomic_write_bytes, read_bound_safetensors
from pipeline.model import merging
from pipeline.model.spec import parse_merge
from pipeline.model.tower import ExitHead, check_visual

log = logging.getLogger(__name__)

HEADS_FORMAT = "icar-exit-heads"
HEADS_VERSION = "1"


class HeadsMismatchError(ValueError):
    """Exit heads were trained for another backbone (or other exits) than the one they are loaded onto."""


def default_exits(num_blocks: int) -> list[int]:
    """Return the default exit depths for a tower of ``num_blocks`` blocks: half, three quarters, all (24 -> [12, 18, 24])."""
    if num_blocks < 1:
        raise ValueError(f"a tower needs at least one block, got num_blocks={num_blocks}")
    return sorted({max(1, round(num_blocks / 2)), max(1, round(3 * num_blocks / 4)), num_blocks})


def validate_exits(exits: Iterable[int], num_blocks: int) -> list[int]:
    """Return ``exits`` as a list of ints, or raise ValueError saying what is wrong with them."""
    try:
        out = [int(e) for e in exits]
    except (TypeError, ValueError) as e:
        raise ValueError(f"exits must be integers (block counts), got {exits!r}") from e
    if not out:
        raise ValueError(f"exits must not be empty; e.g. {default_exits(num_blocks)}")
    if out != sorted(out) or len(set(out)) != len(out):
        raise ValueError(f"exits must be sorted and unique, got {out}; e.g. {sorted(set(out))}")
    if out[0] < 1 or out[-1] > num_blocks:
        raise ValueError(f"exits must lie in 1..{num_blocks} (blocks of this tower), got {out}")
    if out[-1] != num_blocks:
        raise ValueError(f"the last exit must be the full depth {num_blocks} (the unmodified tower), got {out}; "
                         f"e.g. {out + [num_blocks]}")
    return out


def _tensor_hash(tensors: dict[str, torch.Tensor], extra: dict) -> str:
    """Return a SHA-256 over sorted tensor names, dtypes, shapes and bytes, plus a JSON of ``extra``."""
    h = hashlib.sha256(json.dumps(extra, sort_keys=True).encode())
    for key in sorted(tensors):
        t = tensors[key].detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{key}|{t.dtype}|{tuple(tensors[key].shape)}|".encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy().data)
    return h.hexdigest()


class ExitHeads(nn.Module):
    """One ExitHead per early exit of a backbone, saved as safetensors together with that backbone's identity."""

    def __init__(self, visual: nn.Module, exits: list[int], backbone: str | None = None):
        super().__init__()
        num_blocks = len(visual.transformer.resblocks)
        self.exits = validate_exits(exits, num_blocks)  # all exit depths, the last = full depth (no head)
        check_visual(visual, self.exits)
        self.num_blocks = num_blocks
        self.backbone = backbone  # model_key of the backbone; None until known (required to save)
        self.heads = nn.ModuleDict({str(e): ExitHead(visual) for e in self.early_exits})
        self.path: str | None = None  # where these heads were last saved or loaded from
        self.merge = "none"  # the token-merging schedule (pipeline.model.merging spec) the heads were trained under
        # {exit: similarity scale} from the file's metadata (`icar train-exits`); {} when it records none
        self.saved_scales: dict[int, float] = {}
        self.saved_offsets: dict[int, float] = {}

    @classmethod
    def for_bundle(cls, bundle, exits: list[int] | None = None) -> "ExitHeads":
        """Return fresh heads for ``bundle``'s tower (init from ln_post/proj), tied to its identity."""
        exits = list(exits) if exits is not None else default_exits(bundle.num_blocks)
        return cls(bundle.model.visual, exits, backbone=model_key(bundle.identity))

    @property
    def early_exits(self) -> list[int]:
        """Return the exits that have a head (all but the full depth)."""
        return self.exits[:-1]

    def head(self, depth: int) -> ExitHead:
        """Return the head of exit ``depth``."""
        return self.heads[str(depth)]

    @property
    def exit_scales(self) -> dict[int, float]:
        """Return {exit depth: similarity scale} for every exit: the scales the heads were saved with, 1.0 for the
        full depth and for exits (or older heads files) without one. `icar index` multiplies each row by its run's
        scale for the row's exit (run.json ``exit_scales``); the heads' own embeddings stay unit-norm."""
        return {e: self.saved_scales.get(e, 1.0) for e in self.exits}

    @property
    def exit_offsets(self) -> dict[int, float]:
        """Return {exit depth: similarity offset} for every exit: the offsets the heads were saved with, 0.0 for the
        full depth and for exits (or older heads files) without one. With the scale, an exit-k row scores
        scale_k * cosine + offset_k in `icar index`'s index (run.json ``exit_offsets``; one extra index dimension)."""
        return {e: self.saved_offsets.get(e, 0.0) for e in self.exits}

    def recorded_calibration(self) -> dict:
        """Return {"exit_scales", "exit_offsets"}: the score calibration `icar index` applies to rows of these heads,
        each None where the heads file records none (the scales are also given, all 1.0 where unrecorded, when only
        offsets are recorded: an offset always travels with its scale)."""
        return {"exit_scales": self.exit_scales if self.saved_scales or self.saved_offsets else None,
                "exit_offsets": self.exit_offsets if self.saved_offsets else None}

    def sha256(self) -> str:
        """Return a hash of the heads' tensors, exits and backbone (stable across save/load and processes)."""
        return _tensor_hash(self.heads.state_dict(), {"exits": self.exits, "backbone": self.backbone})

    @property
    def identity(self) -> dict:
        """Return {"sha256", "path", "exits", "backbone"}: what run.json records under "heads"."""
        ident = {"sha256": self.sha256(), "path": self.path, "exits": list(self.exits), "backbone": self.backbone}
        return ident if self.merge == "none" else {**ident, "merge": self.merge}

    def to_bytes(self, extra_metadata: dict | None = None) -> bytes:
        """Return these heads serialised as safetensors, with backbone and exits in the metadata."""
        if not self.backbone:
            raise ValueError("these heads do not know their backbone; create them with "
                             "ExitHeads.for_bundle(bundle, exits) (or pass backbone=model_key(identity))")
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous().clone()
                   for k, v in self.heads.state_dict().items()}
        meta = {"format": HEADS_FORMAT, "version": HEADS_VERSION, "backbone": self.backbone,
                "exits": json.dumps(self.exits), "sha256": self.sha256()}
        if self.merge != "none":
            meta["merge"] = self.merge
        meta.update({k: str(v) for k, v in (extra_metadata or {}).items()})
        return st_save(tensors, metadata=meta)

    def save(self, path: str, extra_metadata: dict | None = None) -> dict:
        """Write the heads to ``path`` (local or fsspec URL) atomically; return their identity."""
        atomic_write_bytes(path, self.to_bytes(extra_metadata))
        self.path = path
        log.info("saved exit heads %s (exits %s) for %s", path, self.exits, self.backbone)
        return self.identity

    @classmethod
    def load(cls, path: str, bundle) -> "ExitHeads":
        """Return the heads saved at ``path`` for ``bundle``'s tower; raise HeadsMismatchError for another backbone."""
        want = model_key(bundle.identity)
        data, meta = read_bound_safetensors(
            path, HEADS_FORMAT, "exit-heads", "an", "train heads with `icar train-exits`", want, HeadsMismatchError,
            "load the model they belong to, or train heads for this one with `icar train-exits`")
        exits = json.loads(meta["exits"])
        heads = cls(bundle.model.visual, exits, backbone=want).float()  # copies of a bf16 tower's ln_post/proj
        state = st_load(data)
        try:
            heads.heads.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(f"exit heads {path} do not fit {want}'s tower: {e}") from e
        like = next(bundle.model.visual.parameters())
        # Kept in float32, as saved, whatever the tower's precision: they are tiny beside it, take features in any
        # dtype (ExitHead.from_features), and their identity (sha256, which run.json records and confidence heads
        # are bound to) must not change with the precision a worker runs at.
        heads.to(device=like.device)
        heads.path = path
        heads.merge = meta.get("merge") or "none"
        heads.saved_scales = parse_exit_scales(meta.get(EXIT_SCALES), path)
        heads.saved_offsets = parse_exit_offsets(meta.get(EXIT_OFFSETS), path)
        for key, saved in ((EXIT_SCALES, heads.saved_scales), (EXIT_OFFSETS, heads.saved_offsets)):
            unknown = sorted(set(saved) - set(heads.exits))
            if unknown:
                raise ValueError(f"exit heads {path} record {key} for exits {unknown}, which are not theirs (exits "
                                 f"{heads.exits}); retrain them with `icar train-exits`")
        return heads


class AdaptiveEncoder(nn.Module):
    """open_clip ViT image tower that stops each image at its own exit depth (see the module docstring)."""

    def __init__(self, visual: nn.Module, exits: list[int], heads: ExitHeads | None = None,
                 schedules: Iterable | None = None, merge_heads: dict | None = None):
        """``schedules``: the token-merging schedules (pipeline.model.merging) rows may ask for by index in ``forward``'s
        ``merge_ids``; index 0 is always no merging. ``merge_heads``: {schedule spec: ExitHeads trained under that
        schedule}; an early exit of a schedule without its own heads uses ``heads``."""
        super().__init__()
        blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
        if blocks is None:
            raise TypeError(f"adaptive depth needs an open_clip VisionTransformer (ViT-*), got {type(visual).__name__}")
        self.num_blocks = len(blocks)
        self.exits = validate_exits(exits, self.num_blocks)
        check_visual(visual, self.exits)
        self.visual = visual
        if heads is None:
            heads = ExitHeads(visual, self.exits)
            if self.exits[:-1]:
                log.info("no trained exit heads: early exits %s use copies of the tower's ln_post/proj",
                         self.exits[:-1])
        missing = [e for e in self.exits[:-1] if str(e) not in heads.heads]
        if missing:
            raise ValueError(f"exit heads (trained for exits {heads.exits}) have no head for exits {missing}; "
                             f"choose exits among {heads.exits} or train heads for {self.exits}")
        if heads.num_blocks != self.num_blocks:
            raise HeadsMismatchError(f"exit heads are for a {heads.num_blocks}-block tower, this one has "
                                     f"{self.num_blocks}")
        self.heads = heads
        # Replacement modules for the blocks, computing the same function faster (pipeline.model.cpu_blocks), set
        # by an inference-only caller (the model worker); a plain list, so they are no part of the state dict.
        self.inference_blocks: list[nn.Module] | None = None
        self.schedules = [None] + [s for s in dict.fromkeys(parse_merge(x) for x in schedules or ()) if s]
        if len(self.schedules) > 1:
            merging.check_mergeable(visual)
        self.merge_heads = {parse_merge(k).spec: v for k, v in (merge_heads or {}).items()}
        self._merge_head_modules = nn.ModuleList(self.merge_heads.values())  # so .to(device) moves them too
        for spec, mh in self.merge_heads.items():
            lacking = [e for e in self.exits[:-1] if str(e) not in mh.heads]
            if lacking or mh.num_blocks != self.num_blocks:
                raise ValueError(f"exit heads for merge schedule {spec} (exits {mh.exits}) do not cover exits {lacking} "
                                 f"of this {self.num_blocks}-block encoder; train them with `icar train-exits --merge`")

    def _final(self, tokens: torch.Tensor) -> torch.Tensor:
        """Return the unmodified tower's output for full-depth tokens (its own ln_post, pooling, proj)."""
        pooled, _ = self.visual._pool(tokens)
        return pooled @ self.visual.proj if self.visual.proj is not None else pooled

    def _exit(self, depth: int, tokens: torch.Tensor, size: torch.Tensor | None = None, schedule=None) -> torch.Tensor:
        """Return the unnormalised embeddings of ``tokens`` leaving at ``depth`` (``size``: merged token sizes)."""
        if depth == self.num_blocks:
            return self._final(tokens) if size is None else merging.pool_tower(self.visual, tokens, size)
        head = self.head_for(depth, schedule)
        return head(tokens) if size is None else head.from_features(merging.pool_head(head, tokens, size))

    def head_for(self, depth: int, schedule=None) -> ExitHead:
        """Return the head of early exit ``depth`` for images merged by ``schedule`` (its own heads, if trained)."""
        spec = getattr(schedule, "spec", None)
        if spec is not None and spec in self.merge_heads:
            return self.merge_heads[spec].head(depth)
        return self.heads.head(depth)

    def _blocks(self, x: torch.Tensor, size, start: int, stop: int, schedule, num_tokens: int):
        """Return (tokens, sizes) after blocks start..stop-1; ``schedule`` None runs the blocks as they are."""
        if schedule is None:
            for blk in (self.inference_blocks or self.visual.transformer.resblocks)[start:stop]:
                x = blk(x)
            return x, size
        return merging.run_blocks(self.visual.transformer.resblocks, x, size, schedule, start, stop, num_tokens)

    def _dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    def forward(self, pixels: torch.Tensor, exit_layers: torch.Tensor, merge_ids: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Return float32 L2-normalised embeddings (N, D); row i leaves the tower after ``exit_layers[i]`` blocks.

        ``pixels``: normalised float (N, 3, S, S); ``exit_layers``: ints (N,), each one of ``self.exits``;
        ``merge_ids``: optional ints (N,) indexing ``self.schedules`` (0 = no merging). Rows are grouped by
        schedule (merged token counts differ, so schedules cannot share a batch); each group runs on its own,
        still leaving at its rows' exits.
        """
        n = pixels.shape[0]
        depths = torch.as_tensor(exit_layers).reshape(-1).to("cpu", torch.long)  # one host sync at most
        if depths.numel() != n:
            raise ValueError(f"exit_layers has {depths.numel()} entries for a batch of {n} images")
        if n == 0:
            return torch.empty(0, self.visual.output_dim, dtype=torch.float32, device=pixels.device)
        bad = sorted(set(depths.unique().tolist()) - set(self.exits))
        if bad:
            raise ValueError(f"exit_layers holds depths {bad} that are not exits of this encoder {self.exits}")
        if merge_ids is None:
            return self._forward_group(pixels, depths, None)
        ids = torch.as_tensor(merge_ids).reshape(-1).to("cpu", torch.long)
        if ids.numel() != n:
            raise ValueError(f"merge_ids has {ids.numel()} entries for a batch of {n} images")
        groups = ids.unique().tolist()
        if groups[0] < 0 or groups[-1] >= len(self.schedules):
            raise ValueError(f"merge_ids holds {groups}, but this encoder has schedules 0..{len(self.schedules) - 1} "
                             f"({[getattr(s, 'spec', 'none') for s in self.schedules]})")
        if len(groups) == 1:
            return self._forward_group(pixels, depths, self.schedules[groups[0]])
        out = torch.empty(n, self.visual.output_dim, dtype=torch.float32, device=pixels.device)
        for g in groups:
            rows = (ids == g).nonzero().squeeze(1)
            on = rows.to(pixels.device)
            out[on] = self._forward_group(pixels[on], depths[rows], self.schedules[g])
        return out

    def _forward_group(self, pixels: torch.Tensor, depths: torch.Tensor, schedule) -> torch.Tensor:
        """Return the embeddings of rows that share one merge schedule (``depths``: their exits, on the CPU)."""
        n = pixels.shape[0]
        counts = torch.bincount(depths, minlength=self.num_blocks + 1).tolist()
        # Deepest first: rows leaving at each exit are then the tail of what is left, and what continues is a
        # contiguous prefix (a view). The gather happens once, on the input.
        order = torch.argsort(depths, descending=True, stable=True)
        presorted = bool(torch.equal(order, torch.arange(n)))
        x = pixels if presorted else pixels[order.to(pixels.device)]
        x = self.visual._embeds(x.to(self._dtype()))
        num_tokens, size = x.shape[1], None
        pieces: list[torch.Tensor] = []  # per exit, shallowest first; each is the tail of the sorted batch
        remaining, depth = n, 0
        for e in self.exits:
            if remaining == 0:
                break
            x, size = self._blocks(x, size, depth, e, schedule, num_tokens)
            depth = e
            k = counts[e]
            if k:
                pieces.append(self._exit(e, x[remaining - k:], None if size is None else size[remaining - k:],
                                         schedule))
                x = x[:remaining - k]
                size = None if size is None else size[:remaining - k]
                remaining -= k
        emb = F.normalize(torch.cat(pieces[::-1]).float(), dim=-1)  # back in sorted (deepest-first) order
        if presorted:
            return emb
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(n)
        return emb[inverse.to(emb.device)]

    def forward_all_exits(self, pixels: torch.Tensor, schedule=None) -> dict[int, torch.Tensor]:
        """Return {exit: float32 L2-normalised embeddings (N, D)} with every image taken through every exit.

        ``schedule``: a token-merging schedule (pipeline.model.merging; a spec string or MergeSchedule) or None.
        """
        schedule = parse_merge(schedule)
        x = self.visual._embeds(pixels.to(self._dtype()))
        out, depth, num_tokens, size = {}, 0, x.shape[1], None
        for e in self.exits:
            x, size = self._blocks(x, size, depth, e, schedule, num_tokens)
            depth = e
            out[e] = F.normalize(self._exit(e, x, size, schedule).float(), dim=-1)
        return out

    def exit_features(self, pixels: torch.Tensor, schedule=None) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """Return ({early exit: pooled features (N, width)}, full-depth embeddings (N, D) L2-normalised).

        The features are what the heads' trainable part takes (``ExitHead.from_features``): trainers with a
        frozen backbone compute them once and train on them for many epochs. ``schedule``: token merging
        (pipeline.model.merging) applied on the way, for heads that will serve merged images.
        """
        schedule = parse_merge(schedule)
        x = self.visual._embeds(pixels.to(self._dtype()))
        feats, depth, num_tokens, size = {}, 0, x.shape[1], None
        for e in self.exits:
            x, size = self._blocks(x, size, depth, e, schedule, num_tokens)
            depth = e
            if e < self.num_blocks:
                feats[e] = merging.pool_head(self.heads.head(e), x, size)
        return feats, F.normalize(self._exit(self.num_blocks, x, size).float(), dim=-1)

    def forward_confident(self, pixels: torch.Tensor, confidence, thresholds) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (float32 L2-normalised embeddings (N, D), exit depth per row (int16, CPU)), each row leaving at
        the first early exit where ``confidence`` (ConfidenceHeads, pipeline/model/confidence.py) scores it >= that
        exit's threshold; the last exit takes the rest.

        One shrinking-batch pass: at each early exit the remaining rows' pooled features feed the confidence head,
        the rows that clear the threshold leave through the exit head (from the same pooled features) and only
        the rest run the next blocks; no block runs twice. A threshold of +inf skips the exit's confidence head.
        A threshold may also be one per row (a (N,) tensor or array, e.g. ``ConfidenceRouter.row_thresholds`` of a
        router that also reads complexity scores); a NaN one never clears.
        Unmerged only (token-merging profiles route by complexity score).
        """
        thresholds = [torch.as_tensor(t, dtype=torch.float32) if getattr(t, "ndim", 0) else float(t)
                      for t in thresholds]
        for t in thresholds:
            if isinstance(t, torch.Tensor) and t.shape != (pixels.shape[0],):
                raise ValueError(f"per-row confidence thresholds must have shape ({pixels.shape[0]},), one per "
                                 f"image, got {tuple(t.shape)}")
        if len(thresholds) != len(self.exits) - 1:
            raise ValueError(f"{len(thresholds)} confidence thresholds for the {len(self.exits) - 1} early exits "
                             f"{self.exits[:-1]} of this encoder")
        n = pixels.shape[0]
        out = torch.empty(n, self.visual.output_dim, dtype=torch.float32, device=pixels.device)
        depth_of = torch.full((n,), self.num_blocks, dtype=torch.int16)
        if n == 0:
            return out, depth_of
        x = self.visual._embeds(pixels.to(self._dtype()))
        rows = torch.arange(n, device=pixels.device)  # original position of each row still in the tower
        depth = 0
        for e, threshold in zip(self.exits[:-1], thresholds):
            x, _ = self._blocks(x, None, depth, e, None, 0)
            depth = e
            if isinstance(threshold, torch.Tensor):
                threshold = threshold.to(pixels.device)[rows]  # the rows still in the tower
            elif threshold == float("inf"):
                continue
            head = self.heads.head(e)
            feats = head.pool_features(x)
            leave = confidence.score(e, feats) >= threshold
            leaving = rows[leave]
            if leaving.numel():  # one host sync per open exit
                out[leaving] = F.normalize(head.from_features(feats[leave]).float(), dim=-1)
                depth_of[leaving.cpu()] = e
                stay = ~leave
                x, rows = x[stay], rows[stay]
            if rows.numel() == 0:
                return out, depth_of
        x, _ = self._blocks(x, None, depth, self.num_blocks, None, 0)
        out[rows] = F.normalize(self._final(x).float(), dim=-1)
        return out, depth_of
