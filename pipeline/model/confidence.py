"""Confidence heads: per early exit, a tiny learned map that says whether this exit's embedding is good enough.

The complexity router decides an image's depth before the tower runs. A confidence head decides inside the
tower instead: at each early exit it reads that exit's pooled features (the parameter-free
``ExitHead.pool_features`` the exit head itself starts from, so nothing is computed twice) and returns one
number per image, a prediction of how well the exit's embedding serves retrieval (what it was trained to predict
is ``target``: see pipeline/training/confidence.py). ``AdaptiveEncoder.forward_confident`` lets the rows whose
confidence clears the exit's threshold leave there; the thresholds live in a ``ConfidenceRouter``
(pipeline/model/router.py), fitted by ``icar calibrate --confidence-heads``.

A head is LayerNorm -> Linear(width, hidden) -> GELU -> Linear(hidden, 1) (hidden 0: LayerNorm -> Linear(width,
1)). Saved as safetensors with the backbone's identity and the sha256 of the exit heads it was trained with: the
target depends on those heads' embeddings, so the file refuses to load on any other pair.
"""

from __future__ import annotations

import hashlib
import json
import logging

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from pipeline.io.schema import model_key
from pipeline.io.storage import atomic_write_bytes, read_bound_safetensors
from pipeline.model.flops import count_gflops
from pipeline.model.tower import ExitHead

log = logging.getLogger(__name__)

CONFIDENCE_FORMAT = "icar-confidence-heads"
CONFIDENCE_VERSION = "1"
TARGETS = ("margin", "loss", "rank", "cosine")  # what a head predicts; pipeline.training.confidence defines each


class ConfidenceMismatchError(ValueError):
    """Confidence heads were trained for another backbone or other exit heads than the ones loaded."""


def heads_summary(exit_heads) -> dict[str, list[float]]:
    """Return {tensor name: [sum, L2 norm]} of exit heads' tensors, in float64.

    A second fingerprint beside the sha256: the worker may hold the same heads cast to bf16/fp16 (whose sha
    differs), and the sums and norms of a cast agree with the originals to well within 1%.
    """
    out = {}
    for key, t in sorted(exit_heads.heads.state_dict().items()):
        t = t.detach().to("cpu", torch.float64)
        out[key] = [float(t.sum()), float(t.norm())]
    return out


def same_heads(recorded: dict, live: dict, rtol: float = 1e-2) -> bool:
    """Return True when two ``heads_summary`` results describe the same heads (up to a precision cast)."""
    if set(recorded) != set(live):
        return False
    for key, (s0, n0) in recorded.items():
        s1, n1 = live[key]
        if abs(n0 - n1) > rtol * max(n0, 1e-12) or abs(s0 - s1) > rtol * max(n0, 1e-12) * 8:
            return False
    return True


class ConfidenceHead(nn.Module):
    """One exit's confidence map: pooled features (N, width) -> one float per image."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)  # the class token is not normalised before ln_post: scale-free input
        self.mlp = (nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, 1)) if hidden > 0
                    else nn.Linear(width, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Return the confidence (N,) of pooled ``features`` (N, width), in the head's dtype."""
        return self.mlp(self.norm(features)).squeeze(-1)


class ConfidenceHeads(nn.Module):
    """A ConfidenceHead per early exit, tied to a backbone and to the exit heads whose embeddings it judges."""

    def __init__(self, exits: list[int], width: int, hidden: int = 64, target: str = "margin",
                 backbone: str | None = None, exit_heads_sha256: str | None = None):
        super().__init__()
        self.exits = [int(e) for e in exits]  # all exits, the last = full depth (no head: everything left ends there)
        if len(self.exits) < 2:
            raise ValueError(f"confidence heads need at least one early exit, got exits {self.exits}")
        if target not in TARGETS:
            raise ValueError(f"confidence target {target!r} is not one of {', '.join(TARGETS)}")
        self.width, self.hidden, self.target = int(width), int(hidden), target
        self.backbone = backbone  # model_key of the backbone (required to save)
        self.exit_heads_sha256 = exit_heads_sha256  # ExitHeads.sha256() of the heads the targets were computed with
        self.exit_heads_summary: dict = {}  # heads_summary() of those heads (matches them across precision casts)
        self.heads = nn.ModuleDict({str(e): ConfidenceHead(self.width, self.hidden) for e in self.early_exits})
        self.path: str | None = None
        self.metrics: dict = {}  # what training measured (saved in the metadata, shown by run.json)
        self.loaded_sha256: str | None = None  # sha256() as loaded (the tensors may be cast to bf16/fp16 after)

    @classmethod
    def for_encoder(cls, bundle, encoder, hidden: int = 64, target: str = "margin") -> "ConfidenceHeads":
        """Return fresh heads for ``encoder``'s early exits, tied to ``bundle``'s identity and the encoder's exit heads."""
        out = cls(encoder.exits, int(bundle.model.visual.transformer.width), hidden, target,
                  backbone=model_key(bundle.identity), exit_heads_sha256=encoder.heads.sha256())
        out.exit_heads_summary = heads_summary(encoder.heads)
        return out

    @property
    def early_exits(self) -> list[int]:
        """Return the exits that have a confidence head (all but the full depth)."""
        return self.exits[:-1]

    def score(self, depth: int, features: torch.Tensor) -> torch.Tensor:
        """Return float32 confidences (N,) at early exit ``depth`` for its pooled ``features`` (N, width)."""
        head = self.heads[str(depth)]
        return head(features.to(head.norm.weight.dtype)).float()

    def sha256(self) -> str:
        """Return a hash of the tensors, exits, target and bindings (stable across save/load and processes; as
        loaded, for heads loaded from a file and cast to a tower's lower precision since)."""
        if self.loaded_sha256 is not None:
            return self.loaded_sha256
        h = hashlib.sha256(json.dumps({"exits": self.exits, "target": self.target, "hidden": self.hidden,
                                       "backbone": self.backbone, "exit_heads": self.exit_heads_sha256},
                                      sort_keys=True).encode())
        for key, t in sorted(self.heads.state_dict().items()):
            t = t.detach().to("cpu", torch.float32).contiguous().reshape(-1)
            h.update(f"{key}|{tuple(t.shape)}|".encode())
            h.update(t.numpy().tobytes())
        return h.hexdigest()

    @property
    def identity(self) -> dict:
        """Return {"sha256", "path", "exits", "target", "backbone", "exit_heads"}: what routers and run.json record."""
        return {"sha256": self.sha256(), "path": self.path, "exits": list(self.exits), "target": self.target,
                "hidden": self.hidden, "backbone": self.backbone, "exit_heads": self.exit_heads_sha256}

    def to_bytes(self) -> bytes:
        """Return the heads as safetensors bytes, bindings and training metrics in the metadata."""
        if not self.backbone:
            raise ValueError("these confidence heads do not know their backbone; create them with "
                             "ConfidenceHeads.for_encoder(bundle, encoder)")
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous().clone()
                   for k, v in self.heads.state_dict().items()}
        meta = {"format": CONFIDENCE_FORMAT, "version": CONFIDENCE_VERSION, "backbone": self.backbone,
                "exit_heads": self.exit_heads_sha256 or "", "exits": json.dumps(self.exits),
                "width": str(self.width), "hidden": str(self.hidden), "target": self.target,
                "exit_heads_summary": json.dumps(self.exit_heads_summary), "sha256": self.sha256(),
                "metrics": json.dumps(self.metrics)}
        return st_save(tensors, metadata=meta)

    def save(self, path: str) -> dict:
        """Write the heads to ``path`` (local or fsspec URL) atomically; return their identity."""
        atomic_write_bytes(path, self.to_bytes())
        self.path = path
        log.info("saved confidence heads %s (exits %s, target %s)", path, self.early_exits, self.target)
        return self.identity

    @classmethod
    def load(cls, path: str, bundle, exit_heads) -> "ConfidenceHeads":
        """Return the heads saved at ``path``; raise ConfidenceMismatchError unless they were trained for ``bundle``
        and for ``exit_heads`` (the ExitHeads the encoder runs)."""
        want = model_key(bundle.identity)
        data, meta = read_bound_safetensors(
            path, CONFIDENCE_FORMAT, "confidence-heads", "a", "train them with `icar train-confidence`", want,
            ConfidenceMismatchError, "train confidence heads for this model with `icar train-confidence`")
        have = exit_heads.sha256()
        recorded = meta.get("exit_heads") or None
        summary = json.loads(meta.get("exit_heads_summary") or "{}")
        if recorded != have and not same_heads(summary, heads_summary(exit_heads)):
            raise ConfidenceMismatchError(
                f"confidence heads {path} judge the embeddings of exit heads {recorded or 'none'}, but "
                f"the encoder runs exit heads {have} ({exit_heads.path or 'the tower projection copies'}); pass the "
                f"--heads they were trained with, or retrain them with `icar train-confidence --heads ...`")
        out = cls(json.loads(meta["exits"]), int(meta["width"]), int(meta["hidden"]), meta["target"],
                  backbone=want, exit_heads_sha256=recorded)
        out.exit_heads_summary = summary
        missing = [e for e in out.early_exits if e not in exit_heads.early_exits]
        if missing:
            raise ConfidenceMismatchError(f"confidence heads {path} have exits {out.early_exits}, the exit heads "
                                          f"{exit_heads.early_exits}: no exit head for {missing}")
        try:
            out.heads.load_state_dict(st_load(data), strict=True)
        except RuntimeError as e:
            raise ValueError(f"confidence heads {path} do not fit their own metadata: {e}") from e
        out.metrics = json.loads(meta.get("metrics") or "{}")
        out.loaded_sha256 = out.sha256()  # before the cast to the tower's dtype, which would change it
        like = next(bundle.model.visual.parameters())
        # Device only: kept in float32 under a bf16 tower (score() casts the features), so their sha256, which
        # routers record, does not change with the precision a worker runs at (as ExitHeads.load does).
        out.to(device=like.device)
        out.path = path
        return out


def confidence_gflops(heads: ConfidenceHeads, visual: nn.Module) -> dict[int, float]:
    """Return {early exit: counted GFLOPs per image of pooling its tokens and running its confidence head}.

    Counted with FlopCounterMode like the tower (pipeline.model.flops). The pooling is counted here and again in
    the exit head's cost at the exit a row leaves through (it is computed once there): a small overcount for
    average-pooling towers, none for class-token pooling (taking a token costs no FLOPs).
    """
    p = next(visual.parameters())
    tokens = torch.zeros(1, int(visual.positional_embedding.shape[0]), heads.width, device=p.device, dtype=p.dtype)
    pool = ExitHead(visual).to(p.device, p.dtype)
    return {e: count_gflops(lambda t, e=e: heads.score(e, pool.pool_features(t)), tokens)
            for e in heads.early_exits}


@torch.no_grad()
def every_exit(encoder, confidence: ConfidenceHeads | None, pixels: torch.Tensor
               ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Return ({early exit: pooled features (N, width)}, {early exit: float32 confidences (N,)} (empty without
    ``confidence``), {exit: float32 L2-normalised embeddings (N, D)}) with every row taken through every exit.

    What training and calibration need of a sample (``encoder``: an AdaptiveEncoder); embedding rows the way
    ``forward_confident`` does, so a row's embedding here equals the one it gets when it leaves at that exit.
    """
    feats, full = encoder.exit_features(pixels)
    conf = {e: confidence.score(e, f) for e, f in feats.items()} if confidence is not None else {}
    emb = {e: torch.nn.functional.normalize(encoder.heads.head(e).from_features(f).float(), dim=-1)
           for e, f in feats.items()}
    emb[encoder.exits[-1]] = full
    return feats, conf, emb
