"""The model stage: scorer, router and adaptive-depth encoder kept resident, applied to decoded batches.

Plain Python/torch, testable without Ray; `pipeline.embed.execution` places one of these on each model actor.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from pipeline import __version__
from pipeline.io.decode import EncodedBatch
from pipeline.model import cpu_blocks, device_decode
from pipeline.model import encoder as enc
from pipeline.model import flops, models, scorer
from pipeline.model import router as routers
from pipeline.model.confidence import ConfidenceHeads, confidence_gflops
from pipeline.model.scorer_identity import router_scorer_mismatch, scorer_options_for
from pipeline.model.spec import (ModelSpec, Profile, confidence_heads_file, merge_spec, parse_merge,
                                 parse_profiles)
from pipeline.runtime import resolve_device, resolve_precision

log = logging.getLogger(__name__)

DEMO_ASSETS = Path(__file__).parent.parent / "assets" / "demo"


def cpu_threads(spec: ModelSpec) -> int:
    """Return the intra-op threads a CPU model computes on: --threads, else $ICAR_TORCH_THREADS, else the
    CPUs Ray reserved for this actor (``--cpus-per-actor``), else 1 (outside Ray: calibrate, tests, benchmarks).

    Without the reservation fallback, an actor reserving N CPUs would compute on one thread and leave N-1 idle
    (measured, ViT-B-32 on 2 cores: 2 threads run 1.6-1.7x the images/s of 1).
    """
    if spec.torch_threads:
        return max(1, int(spec.torch_threads))
    env = os.environ.get("ICAR_TORCH_THREADS")
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise ValueError(f"ICAR_TORCH_THREADS={env!r} is not a whole number of threads; unset it or give "
                             f"e.g. 2") from None
    try:
        import ray  # lazy: the model stage also runs without Ray (calibrate, tests, benchmarks)

        # Only inside an actor: a driver has no reservation (and Ray refuses the question there).
        if ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None:
            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 0.0)
            if cpus >= 1:
                return int(cpus)
    except ImportError:  # Ray is a dependency of the pipeline, but the model stage runs without it too
        pass
    return 1


def build_router(spec: ModelSpec, exits: list[int]):
    """Return the router that ``spec`` asks for, and say which one in the log."""
    chosen = [name for name, on in (("--full-depth", spec.full_depth), ("--exit-at", spec.exit_at is not None),
                                    ("--route-fractions", spec.route_fractions is not None),
                                    ("--router", spec.router is not None)) if on]
    if len(chosen) > 1:
        raise ValueError(f"choose one routing option, not {' and '.join(chosen)}")
    if spec.merge is not None:
        return merge_router(spec, exits)
    if spec.full_depth:
        return routers.FixedRouter(exits[-1])
    if spec.exit_at is not None:
        if spec.exit_at not in exits:
            raise ValueError(f"--exit-at {spec.exit_at} is not one of the exits {exits}; add it to --exits")
        return routers.FixedRouter(spec.exit_at)
    if spec.route_fractions is not None:
        return routers.FractionRouter(exits, spec.route_fractions)
    router_path = spec.router
    if router_path is None and spec.model == "demo" and (DEMO_ASSETS / "router.json").exists():
        router_path = str(DEMO_ASSETS / "router.json")
    if router_path is None:
        log.info("no router given: every image runs at full depth (%d blocks)", exits[-1])
        return routers.FixedRouter(exits[-1])
    router = routers.load_router(router_path)
    router_exits = getattr(router, "exits", None)
    if router_exits is not None and list(router_exits) != list(exits):
        raise ValueError(f"router {router_path} routes to exits {list(router_exits)} but the encoder has {exits}; "
                         f"pass --exits {','.join(map(str, router_exits))} or recalibrate with `icar calibrate`")
    return router


def merge_router(spec: ModelSpec, exits: list[int]):
    """Return the one-profile router of ``--merge``: every image at --exit-at (else full depth) under that schedule.

    The same router a hand-written ``{"kind": "profile", "profiles": ["DEPTH@SCHEDULE"], "thresholds": []}`` file
    gives, so the worker counts the merged GFLOPs and run.json records the profile the same way.
    """
    if spec.router is not None or spec.route_fractions is not None:
        raise ValueError("--merge applies one schedule to every image; a router with merge schedules comes from "
                         "`icar calibrate --profiles ...`: drop --merge, or drop --router/--route-fractions")
    depth = spec.exit_at if spec.exit_at is not None else exits[-1]
    if depth not in exits:
        raise ValueError(f"--exit-at {depth} is not one of the exits {exits}; add it to --exits")
    profile = Profile(depth, parse_merge(spec.merge))
    log.info("--merge %s: every image runs profile %s", spec.merge, profile.spec)
    return routers.ProfileRouter([profile.spec], [])


class ModelWorker:
    """Scores, routes and embeds batches of decoded images; holds the models for its whole life."""

    def __init__(self, spec: ModelSpec):
        t0 = time.perf_counter()
        self.spec = spec
        self.device = resolve_device(spec.device)
        if self.device == "cpu":
            torch.set_num_threads(cpu_threads(spec))
        self.precision = resolve_precision(spec.precision, self.device)
        # On a CPU the weights themselves are cast: autocast over fp32 weights casts them again at every matmul,
        # which costs more than bf16 saves (ViT-B-32, 2 threads: autocast 0.78x fp32, bf16 weights 2.0x). On a GPU
        # the weights stay fp32 under autocast (its casts are cheap there; LayerNorm and softmax stay fp32).
        on_cpu = self.device == "cpu"
        self.bundle = models.load_clip(spec.model, spec.pretrained, seed=spec.seed, device=self.device,
                                       precision=self.precision.precision if on_cpu else "fp32")
        exits = list(spec.exits) if spec.exits else enc.default_exits(self.bundle.num_blocks)
        if spec.exit_at is not None and spec.exit_at not in exits:
            exits = sorted(set(exits) | {spec.exit_at})
        heads_path = spec.heads
        if heads_path is None and spec.model == "demo" and (DEMO_ASSETS / "exit_heads.safetensors").exists():
            heads_path = str(DEMO_ASSETS / "exit_heads.safetensors")
        self.heads = enc.ExitHeads.load(heads_path, self.bundle) if heads_path else None
        if self.heads is not None and spec.exits is None:
            exits = list(self.heads.exits)
        self.encoder = enc.AdaptiveEncoder(self.bundle.model.visual, exits, self.heads).to(self.device).eval()
        visual = self.encoder.visual
        tokens = int(visual.positional_embedding.shape[0]) if hasattr(visual, "positional_embedding") else 50
        self.kernels = cpu_blocks.fast_blocks(visual.transformer.resblocks, self.device, rows_hint=32 * tokens)
        self.encoder.inference_blocks = self.kernels.blocks
        self.exits = exits
        self.router = build_router(spec, exits)
        # A confidence router decides inside the tower: a scorer then runs only when named (--scorer heuristic ...),
        # unless its rule also reads complexity scores (a complexity block: needs_scores).
        unasked = (isinstance(self.router, routers.ConfidenceRouter) and spec.scorer == "default"
                   and not self.router.needs_scores)
        self.scorer = None if unasked else scorer.scorer_for_model(
            spec.model, spec.scorer, spec.scorer_checkpoint, device=self.device, image_size=self.bundle.image_size)
        if on_cpu and self.bundle.dtype != torch.float32 and isinstance(self.scorer, scorer.TrainedScorer):
            self.scorer.cast(self.bundle.dtype)  # a CNN scorer left in fp32 is ~1/3 of a bf16 ViT-B-32 worker's time
        if self.scorer is None and getattr(self.router, "needs_scores", False):
            if isinstance(self.router, routers.ConfidenceRouter):
                fix = scorer_options_for(self.router.scorer_identity or {}, spec.model) or "--scorer default"
                raise ValueError("the confidence router also reads complexity scores (calibrated with "
                                 f"--complexity-weight) but --scorer none was given; pass {fix} (the scorer it was "
                                 "calibrated with), or recalibrate without --complexity-weight")
            raise ValueError("the router routes by complexity score but --scorer none was given; choose a scorer")
        self._check_router_scorer()
        self.gflops_per_exit = {int(k): float(v) for k, v in flops.exit_gflops(self.bundle, exits).items()}
        self.scorer_gflops = float(self.scorer.gflops_per_image) if self.scorer is not None else 0.0
        self._gflops_lookup = np.zeros(max(exits) + 1, np.float32)
        for depth, g in self.gflops_per_exit.items():
            self._gflops_lookup[depth] = g + self.scorer_gflops
        self.profiles = self._setup_profiles(exits)  # None unless the router routes to (exit, merge) profiles
        self.confidence = self._setup_confidence()  # None unless the router decides by confidence inside the tower
        self.autocast = None if on_cpu else {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
            self.precision.precision)
        log.info("model worker ready in %.1fs on %s: %s exits %s, precision %s (%s: %s), blocks on %s kernels (%s)",
                 time.perf_counter() - t0, self.device, self.bundle.identity.get("name"), exits,
                 self.precision.precision, self.precision.requested, self.precision.reason, self.kernels.kernels,
                 self.kernels.reason)

    def _check_router_scorer(self) -> None:
        """Refuse a router whose thresholds were calibrated on another scorer's scores than this worker's.

        Its thresholds are quantiles of that scorer's scores (and its cost plan counted that scorer's GFLOPs), so
        with another scorer the exit mix and the GFLOPs budget silently stop holding. Only what defines the
        scores is compared (scorer_identity.SCORE_DEFINING), not where a checkpoint lies. Routers that record no
        scorer, or route without scores, pass. The driver runs the same check before Ray (pipeline.embed.validate).
        """
        recorded = getattr(self.router, "scorer_identity", None)
        if not recorded or not getattr(self.router, "needs_scores", False) or self.scorer is None:
            return
        where = self.spec.router or "the demo's shipped router (pipeline/assets/demo/router.json)"
        problem = router_scorer_mismatch(where, recorded, self.scorer.identity, self.spec.model, self.spec.scorer)
        if problem:
            raise ValueError(problem)

    def _setup_profiles(self, exits: list[int]) -> list[dict] | None:
        """Rebuild the encoder for a profile router's merge schedules; return run.json's profile list.

        A profile is (exit depth, token-merging schedule); its GFLOPs are counted on the merged forward
        (pipeline.model.flops.tower_profile) and looked up per row like the exits' are.
        """
        names = getattr(self.router, "profiles", None)
        if names is None:
            return None
        profiles = parse_profiles(names)
        outside = sorted({p.exit for p in profiles} - set(exits))
        if outside:
            raise ValueError(f"router profiles {names} exit at {outside}, which are not exits of the encoder {exits}; "
                             f"pass --exits with them or recalibrate with `icar calibrate --profiles`")
        schedules = [p.merge for p in profiles if p.merge is not None]
        merge_heads = {spec: enc.ExitHeads.load(path, self.bundle) for spec, path in self.router.heads.items()}
        for spec, mh in merge_heads.items():
            if mh.merge != merge_spec(parse_merge(spec)):
                raise ValueError(f"router {self.spec.router} names heads {mh.path} for merge schedule {spec}, but they "
                                 f"were trained under {mh.merge}; train them with `icar train-exits --merge {spec}`")
        self.encoder = enc.AdaptiveEncoder(self.bundle.model.visual, exits, self.heads, schedules,
                                           merge_heads).to(self.device).eval()
        self.encoder.inference_blocks = self.kernels.blocks  # rows of schedule 0 (no merging) use them
        ids = {merge_spec(s): i for i, s in enumerate(self.encoder.schedules)}
        self._profile_exit = np.asarray([p.exit for p in profiles], np.int16)
        self._profile_merge = np.asarray([ids[merge_spec(p.merge)] for p in profiles], np.int64)
        costs = [flops.profile_cost(self.bundle, p) for p in profiles]
        self._profile_gflops = np.asarray(costs, np.float32) + np.float32(self.scorer_gflops)
        return [{"profile": p.spec, "exit": p.exit, "merge": merge_spec(p.merge), "gflops": g,
                 "heads": self.router.heads.get(merge_spec(p.merge))} for p, g in zip(profiles, costs)]

    def _setup_confidence(self) -> ConfidenceHeads | None:
        """Load a confidence router's heads (bound to this model and these exit heads) and count their GFLOPs.

        Sets the per-row cost lookup: a row leaving at an exit spent the tower to it, every confidence head run on
        the way and the scorer if one runs (``ConfidenceRouter.gflops_per_exit``).
        """
        if not isinstance(self.router, routers.ConfidenceRouter):
            return None
        path = confidence_heads_file(self.router.confidence["path"], self.spec.router or str(DEMO_ASSETS / "router.json"))
        heads = ConfidenceHeads.load(path, self.bundle, self.encoder.heads)
        recorded = self.router.confidence.get("sha256")
        if recorded and recorded != heads.sha256():
            raise ValueError(f"router {self.spec.router} was calibrated for confidence heads {recorded[:16]}…, but "
                             f"{path} holds {heads.sha256()[:16]}…; recalibrate with `icar calibrate "
                             f"--confidence-heads {path}`")
        self.confidence_gflops = confidence_gflops(heads, self.bundle.model.visual)
        self._confidence_cost = self.router.gflops_per_exit(self.gflops_per_exit, self.confidence_gflops,
                                                            self.scorer_gflops)
        self._gflops_lookup = np.zeros(max(self.exits) + 1, np.float32)
        for depth, g in self._confidence_cost.items():
            self._gflops_lookup[depth] = g
        return heads.to(self.device).eval()

    def _embed_confident(self, pixels: np.ndarray, scores: np.ndarray, t0: float) -> dict:
        """Return ``embed``'s result with each row's exit decided by the confidence heads inside the tower."""
        x = models.pixels_to_tensor(self.bundle, pixels).to(self.device, non_blocking=True)
        with torch.autocast(self.device.split(":")[0], dtype=self.autocast, enabled=self.autocast is not None):
            # A complexity block turns into per-row thresholds on the raw confidence (router.row_thresholds), which
            # forward_confident takes as they are (arrays become tensors on the rows' device there).
            emb, depth = self.encoder.forward_confident(x, self.confidence, self.router.row_thresholds(scores))
        exit_layer = depth.numpy().astype(np.int16)
        emb = torch.nn.functional.normalize(emb.float(), dim=-1).to(torch.float16).cpu().numpy()
        return {"embedding": emb, "complexity": scores, "exit_layer": exit_layer,
                "gflops": self._gflops_lookup[exit_layer], "seconds": time.perf_counter() - t0}

    def drop_scorer(self) -> None:
        """Stop scoring: release the scorer and stop counting its GFLOPs in each row (for routers that route
        without scores, e.g. by a hash of the key in benchmarks)."""
        if self.scorer is not None and getattr(self, "_profile_gflops", None) is not None:
            self._profile_gflops = self._profile_gflops - np.float32(self.scorer_gflops)
        self.scorer, self.scorer_gflops = None, 0.0

    def describe(self) -> dict:
        """Return the identity of everything this worker computes with (what run.json records)."""
        # Lazy: imported here only for their versions. The model has loaded open_clip by now (and a trained
        # scorer timm), but importing this module must not cost their ~4 s (the scorer-only jobs, tests).
        import open_clip
        import ray
        import timm

        heads = self.heads.identity if self.heads is not None else None
        return {
            "model": self.bundle.identity,
            "exits": self.exits,
            **({"profiles": self.profiles} if self.profiles is not None else {}),
            **({"confidence": {**self.confidence.identity, "gflops": {str(k): v for k, v in self.confidence_gflops.items()},
                               "gflops_per_exit": {str(k): v for k, v in self._confidence_cost.items()}}}
               if self.confidence is not None else {}),
            "heads": heads,
            # The per-exit score calibration `icar index` applies to this run's rows (the heads file's exit_scales and
            # exit_offsets; shards stay unit-norm): only what the heads record, so runs without keep today's run.json.
            **{key: {str(e): v for e, v in values.items() if e in self.exits}
               for key, values in (self.heads.recorded_calibration() if self.heads is not None else {}).items()
               if values is not None},
            "router": self.router.to_dict(),
            "scorer": self.scorer.identity if self.scorer is not None else None,
            "gflops_per_exit": {str(k): v for k, v in self.gflops_per_exit.items()},
            "scorer_gflops": self.scorer_gflops,
            "gflops_note": "per image: image tower up to the exit + scorer; counted with FlopCounterMode "
                           "(grad on, SDPBackend.MATH), a multiply-add = 2 FLOPs; the text tower is spent per query",
            "image_size": self.bundle.image_size,
            "embed_dim": self.bundle.embed_dim,
            "device": self.device,
            "precision": self.precision.precision,  # what it computed in; spec.precision is what was asked
            "precision_reason": self.precision.reason,
            "block_kernels": {"kernels": self.kernels.kernels, "reason": self.kernels.reason},
            "spec": asdict(self.spec),
            # str(): torch's own TorchVersion would import torch in the driver that unpickles this description.
            "versions": {"icar": __version__, "torch": str(torch.__version__), "open_clip": open_clip.__version__,
                         "timm": timm.__version__, "ray": ray.__version__},
        }

    @torch.inference_mode()
    def embed(self, pixels: np.ndarray, keys: list[str]) -> dict:
        """Return embeddings (float16, L2-normalised), complexity, exit layer and GFLOPs for one decoded batch."""
        t0 = time.perf_counter()
        if self.scorer is not None:
            scores = np.asarray(self.scorer.score(pixels), np.float32)
        else:
            scores = np.full(len(keys), np.nan, np.float32)
        if self.confidence is not None:
            return self._embed_confident(pixels, scores, t0)
        merge_ids = None
        if self.profiles is not None:
            profile = self.router.route_profiles(scores, keys).astype(np.int64)
            exit_layer, merge_ids = self._profile_exit[profile], torch.as_tensor(self._profile_merge[profile])
            gflops = self._profile_gflops[profile]
        else:
            exit_layer = np.asarray(self.router.route(scores, keys), np.int16)
            gflops = self._gflops_lookup[exit_layer]
        x = models.pixels_to_tensor(self.bundle, pixels).to(self.device, non_blocking=True)
        with torch.autocast(self.device.split(":")[0], dtype=self.autocast, enabled=self.autocast is not None):
            emb = self.encoder(x, torch.as_tensor(exit_layer, dtype=torch.long, device=self.device), merge_ids)
        emb = torch.nn.functional.normalize(emb.float(), dim=-1).to(torch.float16).cpu().numpy()
        return {
            "embedding": emb,
            "complexity": scores,
            "exit_layer": exit_layer,
            "gflops": gflops,
            "seconds": time.perf_counter() - t0,
        }

    @torch.inference_mode()
    def embed_encoded(self, batch: EncodedBatch, keys: list[str]) -> dict:
        """Return ``embed``'s result for the samples of ``batch`` that decode on this worker's device, plus
        "index" (their batch positions) and "errors" ((position, message) of the others; stage "decode").

        JPEG bytes are decoded here, on the model's device (``icar embed --decode-device cuda``); samples the shard
        task already decoded on its CPU come as pixels. ``seconds`` includes the decoding.
        """
        t0 = time.perf_counter()
        decoded = device_decode.decode_batch(batch, self.bundle.image_size, self.device)
        if decoded.index:
            result = self.embed(decoded.pixels, [keys[i] for i in decoded.index])
        else:  # every sample failed to decode: nothing to embed, the errors are the whole answer
            result = {"embedding": np.zeros((0, self.bundle.embed_dim), np.float16),
                      "complexity": np.zeros(0, np.float32), "exit_layer": np.zeros(0, np.int16),
                      "gflops": np.zeros(0, np.float32)}
        result.update(index=decoded.index, errors=decoded.errors, decode_seconds=decoded.seconds,
                      decode_fallbacks=decoded.fallbacks, seconds=time.perf_counter() - t0)
        return result
