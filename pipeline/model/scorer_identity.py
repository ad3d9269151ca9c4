"""Scorer identities without torch: what defines a scorer's scores, which scorer a run's options give, and how to
ask for the scorer a router was calibrated for.

A router's thresholds are quantiles of one scorer's scores, so `icar embed` must score with that scorer. The
model actors check it on the loaded scorer (``pipeline.model.worker``); the driver checks it before Ray starts from
these identities (``pipeline.embed.validate``), which is why nothing here imports torch. ``pipeline.model.scorer`` builds
its identities from the same definitions; the comparisons live here only.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

ASSETS = Path(__file__).parent.parent / "assets"
DEMO_DIR = ASSETS / "demo"  # the demo model (pipeline.model.models.DEMO_DIR); its scorer.json is its own --scorer default
DEFAULT_CHECKPOINT = ASSETS / "scorer" / "default.safetensors"  # every other model's --scorer default
SHIPPED_NAME = "pipeline/assets/scorer/default.safetensors"  # the shipped file's name in identities
CARD_KEY = "icar_card"  # safetensors metadata key holding a trained scorer's card as JSON

HEURISTIC_METHOD = "sobel_edge_density"
HEURISTIC_INPUT_SIZE = 128  # px the heuristic analyses at, unless a choice (the demo's: 64) says otherwise
HEURISTIC_EDGE_THRESHOLD = 0.1  # luminance step (0..1) that counts as an edge

# What defines a scorer's scores (two scorers equal in these score every image alike); not its file path or label.
SCORE_DEFINING = ("kind", "method", "input_size", "edge_threshold", "sha256", "bins", "backbone")


def scorer_differences(recorded: dict, identity: dict) -> list[str]:
    """Return the score-defining fields (SCORE_DEFINING) in which two scorer identities differ; [] when alike."""
    return [k for k in SCORE_DEFINING if recorded.get(k) != identity.get(k)]


def describe_scorer(identity: dict) -> str:
    """Return a scorer identity in a few words, e.g. "heuristic (sobel_edge_density, 64 px, edge threshold 0.1)"."""
    if identity.get("kind") == "heuristic":
        return (f"heuristic ({identity.get('method')}, {identity.get('input_size')} px, edge threshold "
                f"{identity.get('edge_threshold')})")
    sha = identity.get("sha256") or "?"
    return (f"{identity.get('kind')} ({identity.get('backbone')}, {identity.get('input_size')} px, "
            f"{identity.get('bins')} bins, checkpoint {identity.get('checkpoint')} sha256 {sha[:12]})")


def heuristic_identity(input_size: int = HEURISTIC_INPUT_SIZE,
                       edge_threshold: float = HEURISTIC_EDGE_THRESHOLD) -> dict:
    """Return the identity of the edge-density heuristic at these settings (what HeuristicScorer records)."""
    return {"kind": "heuristic", "name": "heuristic-edge-density", "method": HEURISTIC_METHOD,
            "input_size": int(input_size), "edge_threshold": float(edge_threshold),
            "backbone": None, "sha256": None, "bins": None}


def demo_scorer_choice(demo_dir: Path = DEMO_DIR) -> dict | None:
    """Return the demo model's scorer choice (``demo_dir``/scorer.json), or None when it ships none.

    ``{"kind": ..., "checkpoint"?: file beside it, "input_size"?, "edge_threshold"?}``: a 0.3-GFLOP trained
    scorer would cost 5x a tower as small as the demo's, so the demo scores with the heuristic at 64 px.
    """
    path = Path(demo_dir) / "scorer.json"
    if not path.exists():
        return None
    choice = json.loads(path.read_text())
    unknown = sorted(set(choice) - {"kind", "checkpoint", "input_size", "edge_threshold"})
    if unknown or "kind" not in choice:
        raise ValueError(f"{path} must hold kind and optionally checkpoint, input_size, edge_threshold; "
                         f"got {sorted(choice)}; rewrite it, e.g. {{\"kind\": \"heuristic\", \"input_size\": 64}}")
    return choice


def checkpoint_identity(path: str | os.PathLike) -> dict:
    """Return the score-defining identity of a trained scorer checkpoint at a local ``path``, read from its
    safetensors header (the card) and its bytes (sha256), without building the network."""
    data = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", data[:8]) if len(data) >= 8 else (0,)
    meta = (json.loads(data[8:8 + n]) if n else {}).get("__metadata__") or {}
    if CARD_KEY not in meta:
        raise ValueError(f"{path} has no ICAR card in its metadata; it is not a checkpoint written by "
                         "`icar train-complexity`")
    card = json.loads(meta[CARD_KEY])
    return {"kind": "convnext", "backbone": card.get("backbone"), "bins": card.get("bins"),
            "input_size": card.get("input_size"), "sha256": hashlib.sha256(data).hexdigest(),
            "checkpoint": str(path)}


def expected_identity(model: str, kind: str, checkpoint: str | None) -> dict | None:
    """Return the identity of the scorer `icar embed --model model --scorer kind [--checkpoint]` will load, or None
    when there is none (kind "none") or it cannot be known without loading it (a checkpoint behind a URL).

    Mirrors ``pipeline.model.scorer.scorer_for_model``/``load_scorer``, which the model actors run (and check again).
    """
    options: dict = {}
    if kind == "none":
        return None
    if model == "demo" and kind == "default" and checkpoint is None:
        choice = demo_scorer_choice()
        if choice is not None:
            kind = choice["kind"]
            checkpoint = str(DEMO_DIR / choice["checkpoint"]) if choice.get("checkpoint") else None
            options = {k: choice[k] for k in ("input_size", "edge_threshold") if k in choice}
    if kind == "heuristic":
        return heuristic_identity(**options)
    if checkpoint is None and kind == "default":
        checkpoint = str(DEFAULT_CHECKPOINT) if DEFAULT_CHECKPOINT.exists() else None
        if checkpoint is None:
            return heuristic_identity(**options)
    if checkpoint is None or "://" in checkpoint or not os.path.isfile(checkpoint):
        return None  # a missing file is refused by the option checks; a remote one is checked by the actors
    return checkpoint_identity(checkpoint)


def scorer_options_for(identity: dict, model: str) -> str | None:
    """Return the `icar embed` options that score with ``identity`` for ``model`` (e.g. "--scorer default"), or
    None when no option reproduces it (a heuristic at settings only `icar calibrate` takes)."""
    def same(kind: str) -> bool:
        try:
            other = expected_identity(model, kind, None)
        except ValueError:
            return False
        return other is not None and not scorer_differences(identity, other)

    for kind in ("default", "heuristic"):
        if same(kind):
            return f"--scorer {kind}"
    if identity.get("kind") == "convnext" and identity.get("sha256"):
        path = str(DEFAULT_CHECKPOINT) if identity.get("checkpoint") == SHIPPED_NAME else identity.get("checkpoint")
        if path and os.path.isfile(path) and checkpoint_identity(path)["sha256"] == identity["sha256"]:
            return f"--scorer convnext --checkpoint {path}"
        return f"--scorer convnext --checkpoint FILE with sha256 {identity['sha256']}"
    return None


def router_scorer_mismatch(router: str, recorded: dict, identity: dict, model: str, kind: str) -> str | None:
    """Return why a router calibrated for the scorer ``recorded`` cannot route the scores of ``identity`` (what
    ``--model model --scorer kind`` runs) and the options that fix it; None when the two score alike."""
    differ = scorer_differences(recorded, identity)
    if not differ:
        return None
    fix = scorer_options_for(recorded, model)
    use = (f"pass {fix} to score as the router expects, or " if fix else "")
    return (f"router {router} was calibrated for scorer {describe_scorer(recorded)}, but --scorer {kind} scores with "
            f"{describe_scorer(identity)} (they differ in {', '.join(differ)}), so its thresholds would route on "
            f"another scale and miss its GFLOPs budget: {use}recalibrate for this scorer with "
            f"`icar calibrate ... --model {model} --scorer {kind}`")
