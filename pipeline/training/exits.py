"""Dual-path training of early-exit heads: each exit learns to embed into the same space as the text tower.

Default recipe (frozen backbone): the image backbone and the text tower stay frozen, only the exit heads
(LayerNorm + projection, initialised from ``ln_post``/``proj``) and one temperature per exit train, on features
computed once per image (``features``) for many epochs, which is fast even on a CPU; the loss per exit is CLIP
contrastive against the frozen caption embedding, in the mixed-depth gallery an index of routed rows holds, plus
distillation towards the full-depth embedding (``exit_step``). The heads written are those of the epoch with the
best validation mixed-gallery recall@1, with a per-exit score calibration for a mixed index (scale and offset,
``recall.choose_exit_calibration``, chosen on training pairs; heads metadata ``EXIT_SCALES`` / ``EXIT_OFFSETS``)
recorded beside them. Full-depth embeddings stay bit-identical to the public model, so every existing full-depth
index, run and query encoder stays valid, and heads can be retrained or swapped at any time.

``finetune_backbone`` is the paper's recipe (ICAR, ECIR 2026): the vision backbone trains too (lr ~1e-6,
heads 1e-4), with contrastive loss on both paths weighted 0.5 early / 0.5 full (distillation off by default).
It can buy recall at the early exits, but it changes the full-depth embeddings: the result is a NEW model
(new weights hash), its fine-tuned weights are written next to the heads, and every image already embedded
with the public model must be re-embedded before it can share an index with the new one. It also needs the
backbone's forward and backward for every image in every epoch (no feature cache), i.e. a GPU for real data.
The text tower stays frozen in both modes, so text queries are still encoded by the original text tower.

Execution: one process on CUDA when present (``device="auto"``), or data-parallel over N processes with plain
torch DDP (``distributed``; ``nccl`` on CUDA, one GPU per process, ``gloo`` on CPU), started by
``torchrun --nproc-per-node N -m jobs.train_exits ...`` or by ``workers=N``. The result does not depend on N:
``batch_size`` is the GLOBAL batch, each process decodes and encodes its share of the stream (``shares``), and
the losses are computed as shares that sum to the single-process loss (``exit_step``), so a checkpoint resumes
under any N. Rank 0 alone writes (checkpoints, feature cache, heads, metrics, backbone) and logs progress.

This module is the loop: checkpoints (heads, temperatures, optimizer, scheduler, epoch, history) after every
epoch, ``resume=True`` continuing from the last one, and the metrics document with its before/after table.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.multiprocessing import ProcessExitedException, ProcessRaisedException

from pipeline.io import storage
from pipeline.io.schema import EXIT_OFFSETS, EXIT_SCALES, model_key
from pipeline.model import encoder as enc
from pipeline.model.models import load_clip, pixels_to_tensor
from pipeline.model.spec import merge_spec, parse_merge
from pipeline.runtime import resolve_device
from pipeline.training import distributed
from pipeline.training.backbone import write_backbone
from pipeline.training.exit_config import (CHECKPOINT, HEADS, METRICS, ExitTrainConfig, TrainExitsError, read_output,
                                           write_output)
from pipeline.training.exit_step import (EncoderStep, HeadsStep, HeadTrainer, clip_loss_share, exit_loss_shares,
                                         optimizer_step, parallel)
from pipeline.training.features import FeatureCache, evaluate_features, exit_calibration
from pipeline.training.pairs import PairStats, batches, decode_pixels, shuffled, stack_pixels, take
from pipeline.training.recall import evaluate_embeddings, format_table, mixed_score, summary
from pipeline.training.shares import Assembly, SplitReader

log = logging.getLogger(__name__)

SELECT_EPOCH = ("mixed", "last")
# EXIT_SCALES and EXIT_OFFSETS (pipeline.io.schema), heads-file metadata keys: JSON {exit: scale} and {exit: offset},
# chosen on training pairs by ``recall.choose_exit_calibration``. An exit-k row scored scale * cosine + offset ranks
# fairly against full-depth rows in an inner-product index; the heads' forward does not apply it (shards stay
# unit-norm): `icar index` does, from what run.json records (ExitHeads.exit_scales / exit_offsets, read back from
# this metadata).
SELECTED_BY = ("val mixed-gallery text→image recall@1: mean over early exits of exit|full (the caption's image at "
               "the exit, every other at full depth) and full|exit (the reverse)")


class ExitTrainer:
    """Runs one `icar train-exits` job: load, extract (or stream), evaluate, train, evaluate, write.

    Data-parallel when a process group is initialised (see ``train_exits``); ``self.dist`` says where this
    process stands. Every process builds the same trainer; rank 0 alone writes.
    """

    def __init__(self, cfg: ExitTrainConfig, train_pairs=None, val_pairs=None):
        """``train_pairs``/``val_pairs``: optional re-iterable sources of (key, pixels, caption) instead of the
        shards named by cfg (tests, notebooks); callables returning a fresh iterator each time."""
        if cfg.finetune_backbone and cfg.distill_weight is None:
            cfg = dataclasses.replace(cfg, distill_weight=0.0)
        elif cfg.distill_weight is None:
            cfg = dataclasses.replace(cfg, distill_weight=1.0)
        if cfg.epochs < 0 or cfg.batch_size < 2:
            raise TrainExitsError(f"need epochs >= 0 and batch_size >= 2 (contrastive needs negatives), got "
                                  f"epochs={cfg.epochs} batch_size={cfg.batch_size}")
        if cfg.select_epoch not in SELECT_EPOCH:
            raise TrainExitsError(f"select_epoch must be one of {', '.join(SELECT_EPOCH)}, got {cfg.select_epoch!r}")
        if not 0.0 <= cfg.val_fraction < 1.0:
            raise TrainExitsError(f"val_fraction must be in [0, 1), got {cfg.val_fraction}")
        self.dist = distributed.current()
        if cfg.batch_size < self.dist.world_size:
            raise TrainExitsError(f"batch_size {cfg.batch_size} is the global batch and must give each of the "
                                  f"{self.dist.world_size} processes at least one pair; raise --batch-size")
        self.cfg = cfg
        self.device = distributed.device_of_rank(resolve_device(cfg.device), self.dist)
        self.bundle = load_clip(cfg.model, cfg.pretrained, seed=cfg.seed, device=self.device)
        self.exits = enc.validate_exits(cfg.exits or enc.default_exits(self.bundle.num_blocks), self.bundle.num_blocks)
        if len(self.exits) < 2:
            raise TrainExitsError(f"exits {self.exits} has no early exit to train; e.g. --exits "
                                  f"{','.join(map(str, enc.default_exits(self.bundle.num_blocks)))}")
        self.key = model_key(self.bundle.identity)
        self.heads = enc.ExitHeads.for_bundle(self.bundle, self.exits).to(self.device)
        self.merge = parse_merge(cfg.merge)
        if self.merge is not None and cfg.finetune_backbone:
            raise TrainExitsError("--merge trains heads for merged tokens on the frozen backbone; drop "
                                  "--finetune-backbone or --merge")
        self.heads.merge = merge_spec(self.merge)
        self.encoder = enc.AdaptiveEncoder(self.bundle.model.visual, self.exits, self.heads,
                                           [self.merge] if self.merge else None).eval()
        scale = float(getattr(self.bundle.model, "logit_scale", torch.tensor(math.log(1 / 0.07))).detach().cpu())
        self.trainer = HeadTrainer(self.heads, scale, cfg.learn_temperature, self.bundle.num_blocks).to(self.device)
        self.reader = SplitReader(cfg, self.dist, self.device, self.bundle.image_size, train_pairs, val_pairs)
        self.features = FeatureCache(self.reader, self.encoder, self.bundle, self.key, self.exits, self.merge)

    # --- checkpoints
    def _checkpoint_url(self) -> str:
        return storage.join(self.cfg.output, CHECKPOINT)

    def _save_checkpoint(self, epoch: int, opt, sched, history: list, best: dict | None = None) -> None:
        """Write the state after ``epoch`` (rank 0 only: the state is the same in every process)."""
        if not self.dist.is_main:
            return
        state = {"epoch": epoch, "model_key": self.key, "exits": self.exits,
                 "trainer": {k: v.detach().cpu() for k, v in self.trainer.state_dict().items()},
                 "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "history": history,
                 "finetune_backbone": self.cfg.finetune_backbone, "world_size": self.dist.world_size,
                 "merge": merge_spec(self.merge)}
        if best is not None:
            state["best"] = best
        if self.cfg.finetune_backbone:
            state["visual"] = {k: v.detach().cpu() for k, v in self.bundle.model.visual.state_dict().items()}
        buf = io.BytesIO()
        torch.save(state, buf)
        write_output(self._checkpoint_url(), buf.getvalue(), self.cfg)

    def _earlier_run(self) -> TrainExitsError:
        return TrainExitsError(f"{self._checkpoint_url()} exists from an earlier run: pass --resume to continue it, "
                               f"or choose another --output")

    def _load_checkpoint(self, opt, sched) -> tuple[int, list]:
        """Return (next epoch, history) after restoring a checkpoint, or (0, []) when starting afresh.

        Every process reads it; the barrier after keeps rank 0 from writing the next one before all have.
        """
        try:
            return self._restore(opt, sched)
        finally:
            distributed.barrier(self.dist)

    def _restore(self, opt, sched) -> tuple[int, list]:
        data = read_output(self._checkpoint_url(), self.cfg)
        if data is None:
            if self.cfg.resume:
                log.info("--resume: no checkpoint in %s yet, starting from epoch 0", self.cfg.output)
            return 0, []
        if not self.cfg.resume:
            raise self._earlier_run()
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        if state["model_key"] != self.key or state["exits"] != self.exits \
                or state["finetune_backbone"] != self.cfg.finetune_backbone:
            raise TrainExitsError(
                f"checkpoint in {self.cfg.output} is for model {state['model_key']} exits {state['exits']} "
                f"finetune={state['finetune_backbone']}, not {self.key} exits {self.exits} "
                f"finetune={self.cfg.finetune_backbone}; resume with the same options or use another --output")
        trained_merge = state.get("merge", merge_spec(None))  # checkpoints from before --merge: unmerged
        if trained_merge != merge_spec(self.merge):
            raise TrainExitsError(
                f"checkpoint in {self.cfg.output} was trained under merge schedule {trained_merge}, not "
                f"{merge_spec(self.merge)}: heads serve the schedule they were trained under; resume with "
                f"--merge {trained_merge} or use another --output")
        self.trainer.load_state_dict(state["trainer"])
        if "visual" in state:
            self.bundle.model.visual.load_state_dict(state["visual"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        log.info("resumed from %s after epoch %d (written by %d process(es), resumed by %d)", self._checkpoint_url(),
                 state["epoch"] + 1, state.get("world_size", 1), self.dist.world_size)
        self._best = state.get("best")
        return state["epoch"] + 1, state["history"]

    # --- the job
    def run(self) -> dict | None:
        """Train, write heads + metrics (+ backbone when fine-tuning) to OUTPUT; return the metrics document
        (on rank 0; the other processes of a data-parallel run return None)."""
        if not self.cfg.resume and storage.exists(self._checkpoint_url(), self.cfg.storage_options):
            raise self._earlier_run()  # before minutes of feature extraction, not after
        if self.cfg.finetune_backbone:
            return self._run_finetune()
        return self._run_frozen()

    def _optimizer(self, steps_per_epoch: int | None, extra_groups: list | None = None):
        """Return (AdamW, schedule): cosine decay over all steps when they are known, else a constant rate."""
        cfg = self.cfg
        params = [p for p in self.trainer.parameters() if p.requires_grad]
        groups = [{"params": params, "lr": cfg.lr}] + (extra_groups or [])
        opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
        if steps_per_epoch is None:
            return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, cfg.epochs * steps_per_epoch))
        return opt, sched

    def _run_frozen(self) -> dict | None:
        cfg, d = self.cfg, self.dist
        t_start = time.perf_counter()
        train, val = self.features.get("train"), self.features.get("val")
        if len(train) < 2:
            raise TrainExitsError(f"only {len(train)} training pair(s): contrastive training needs a batch of >= 2")
        before = evaluate_features(self.heads, val, self.bundle.num_blocks)
        steps = math.ceil(len(train) / cfg.batch_size)
        opt, sched = self._optimizer(steps)
        self._best = None  # {"epoch", "score", "trainer": state}: the epoch select_epoch keeps
        start, history = self._load_checkpoint(opt, sched)
        early = self.heads.early_exits
        model = parallel(HeadsStep(self.trainer, early), d, self.device)
        dev = self.device
        full, text = train.full.to(dev), train.text.to(dev)
        feats = {e: v.to(dev) for e, v in train.features.items()}
        for epoch in range(start, cfg.epochs):
            t0 = time.perf_counter()
            self.trainer.train()
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
            sums, n_steps = torch.zeros(len(early), dtype=torch.float64, device=dev), 0
            for s in range(0, len(train), cfg.batch_size):
                idx = order[s:s + cfg.batch_size].to(dev)
                if idx.numel() < 2:
                    continue
                sizes = distributed.split_sizes(idx.numel(), d.world_size)
                lo = sum(sizes[:d.rank])
                mine = idx[lo:lo + sizes[d.rank]]
                emb = model({e: feats[e][mine] for e in early})
                share, parts = exit_loss_shares(d, self.trainer, emb, full[mine], text[mine], text[idx], sizes,
                                                cfg.contrastive_weight, cfg.distill_weight,
                                                all_full=full[idx] if cfg.mixed_gallery else None)
                optimizer_step(share, opt, sched, d)
                sums += torch.stack([parts[e] for e in early]).double()
                n_steps += 1
            sums = distributed.all_sum(d, sums).cpu()  # the shares of every process make each step's loss
            self.trainer.eval()
            val_metrics = evaluate_features(self.heads, val, self.bundle.num_blocks)
            score = mixed_score(val_metrics, early)
            entry = {"epoch": epoch, "seconds": time.perf_counter() - t0,
                     "train_loss": {str(e): float(v) / max(1, n_steps) for e, v in zip(early, sums)},
                     "val": {str(e): summary(m) for e, m in val_metrics.items()}, "val_mixed_t2i@1": score}
            history.append(entry)
            if cfg.select_epoch == "last" or self._best is None or score > self._best["score"]:
                self._best = {"epoch": epoch, "score": score,
                              "trainer": {k: v.detach().cpu().clone() for k, v in self.trainer.state_dict().items()}}
            log.info("epoch %d/%d: loss %s; val t2i R@1 %s, mixed gallery %.3f (%.1fs)", epoch + 1, cfg.epochs,
                     {e: round(v, 4) for e, v in entry["train_loss"].items()},
                     {e: round(m["t2i@1"], 3) for e, m in entry["val"].items()}, score, entry["seconds"])
            self._save_checkpoint(epoch, opt, sched, history, self._best)
        selected = None
        if self._best is not None:  # the heads of the selected epoch are the ones written
            self.trainer.load_state_dict(self._best["trainer"])
            selected = self._best["epoch"]
        after = evaluate_features(self.heads, val, self.bundle.num_blocks)
        calibration = exit_calibration(self.heads, train, val)
        return self._finish(before, after, history, len(train), len(val), time.perf_counter() - t_start, selected,
                            calibration)

    def _run_finetune(self) -> dict | None:
        """The paper's recipe: backbone + heads train on streamed pixels; 0.5/0.5 contrastive on both paths."""
        cfg, d = self.cfg, self.dist
        t_start = time.perf_counter()
        val = self._val_pixels()
        before = self._evaluate_pixels(val)
        visual = self.bundle.model.visual
        backbone = [p for p in visual.parameters()]
        for p in backbone:
            p.requires_grad_(True)
        # Streaming: the number of pairs is only known after a pass, so the rates stay constant (as in the paper).
        opt, sched = self._optimizer(None, [{"params": backbone, "lr": cfg.backbone_lr}])
        n_train = 0
        start, history = self._load_checkpoint(opt, sched)
        model = parallel(EncoderStep(self.encoder, self.trainer), d, self.device)
        full_depth = self.bundle.num_blocks
        early = [e for e in self.exits if e != full_depth]
        w_full = cfg.full_path_weight
        for epoch in range(start, cfg.epochs):
            t0 = time.perf_counter()
            self.encoder.train()
            self.reader.stats["train"] = PairStats()  # what one pass reads
            rng = np.random.default_rng([cfg.seed, epoch])  # per epoch: a resumed run shuffles as a straight one
            n_steps, loss_sum, n_train = 0, torch.zeros((), dtype=torch.float64, device=self.device), 0
            stream = shuffled(take(self.reader.raw("train"), cfg.max_train), cfg.shuffle_buffer, rng)
            for batch in batches(stream, cfg.batch_size):
                # Every process holds the same global batch of encoded images and decodes its contiguous slice.
                cut = distributed.split_sizes(len(batch), d.world_size)
                lo = sum(cut[:d.rank])
                decoded = [(p, c) for k, raw, c in batch[lo:lo + cut[d.rank]]
                           if (p := decode_pixels(k, raw, self.bundle.image_size, self.reader.stats["train"])) is not None]
                sizes = distributed.gather_sizes(d, len(decoded), self.device)  # decode failures shrink shares
                if sum(sizes) < 2:
                    continue
                text = self._text([c for _, c in decoded]).to(self.device)
                all_text = distributed.all_gather_rows(d, text, sizes)
                if decoded:
                    per_exit = model(pixels_to_tensor(self.bundle, np.stack([p for p, _ in decoded]),
                                                      device=self.device))
                else:  # a share of 0 rows (a small last batch): the tower refuses empty batches, and DDP needs
                    # every parameter in the graph, so run one blank image and keep none of its rows
                    blank = np.zeros((1, self.bundle.image_size, self.bundle.image_size, 3), np.uint8)
                    per_exit = {e: v[:0] for e, v in model(pixels_to_tensor(self.bundle, blank,
                                                                              device=self.device)).items()}
                full = per_exit[full_depth]
                loss_full = clip_loss_share(d, full, text, all_text, self.trainer.scale(full_depth), sizes)
                loss_early = sum(clip_loss_share(d, per_exit[e], text, all_text, self.trainer.scale(e), sizes)
                                 for e in early) / len(early)
                share = cfg.contrastive_weight * ((1 - w_full) * loss_early + w_full * loss_full)
                if cfg.distill_weight:
                    target = full.detach()
                    share = share + cfg.distill_weight * sum(
                        (1 - (per_exit[e] * target).sum(dim=1)).sum() for e in early) / len(early) / sum(sizes)
                optimizer_step(share, opt, sched, d)
                loss_sum += share.detach().double()
                n_steps += 1
                n_train += sum(sizes)
            loss_sum = float(distributed.all_sum(d, loss_sum))
            self.reader.merge_stats("train")
            self.encoder.eval()
            val_metrics = self._evaluate_pixels(val)
            entry = {"epoch": epoch, "seconds": time.perf_counter() - t0, "train_loss": loss_sum / max(1, n_steps),
                     "val": {str(e): summary(m) for e, m in val_metrics.items()}}
            history.append(entry)
            log.info("epoch %d/%d: loss %.4f; val t2i R@1 %s (%.1fs)", epoch + 1, cfg.epochs, entry["train_loss"],
                     {e: round(m["t2i@1"], 3) for e, m in entry["val"].items()}, entry["seconds"])
            self._save_checkpoint(epoch, opt, sched, history)
        for p in backbone:
            p.requires_grad_(False)
        after = self._evaluate_pixels(val)
        return self._finish(before, after, history, n_train, len(val.text), time.perf_counter() - t_start)

    def _val_pixels(self) -> "_ValShare":
        """Return this process's share of the validation pixels, with every caption's embedding and group."""
        r = self.reader
        items = list(r.share("val"))
        a = r.assemble([i[0] for i in items], [i[3] for i in items], self.cfg.max_val)
        items = items[:a.keep[self.dist.rank]]
        if sum(a.keep) == 0:
            raise TrainExitsError("no validation pairs: give --val inputs or a --val-fraction above 0")
        r.merge_stats("val")
        pixels = stack_pixels([i[2] for i in items], self.bundle.image_size)
        text = r.gather(self._text([i[3] for i in items]), a)
        return _ValShare(pixels, a, text)

    @torch.no_grad()
    def _text(self, captions: list[str]) -> torch.Tensor:
        if not captions:
            return torch.zeros(0, self.bundle.embed_dim)
        tokens = self.bundle.tokenizer(captions).to(self.device)
        return F.normalize(self.bundle.model.encode_text(tokens).float(), dim=-1).cpu()

    @torch.no_grad()
    def _evaluate_pixels(self, val: "_ValShare") -> dict:
        """Return per-exit metrics on the validation pairs; each process embeds its share, all get the metrics."""
        outs: dict[int, list] = {e: [torch.zeros(0, self.bundle.embed_dim)] for e in self.exits}
        for s in range(0, len(val.pixels), self.cfg.extract_batch_size):
            x = pixels_to_tensor(self.bundle, val.pixels[s:s + self.cfg.extract_batch_size], device=self.device)
            for e, v in self.encoder.forward_all_exits(x).items():
                outs[e].append(v.cpu())
        per_exit = {e: self.reader.gather(torch.cat(v), val.assembly) for e, v in outs.items()}
        return evaluate_embeddings(per_exit, per_exit[self.bundle.num_blocks], val.text, val.assembly.groups)

    def _finish(self, before: dict, after: dict, history: list, n_train: int, n_val: int,
                seconds: float, selected_epoch: int | None = None, calibration: dict | None = None) -> dict | None:
        """Write heads (+ fine-tuned backbone), metrics.json; print the before/after table; return the metrics.

        Rank 0 only; the other processes return None.
        """
        cfg = self.cfg
        if not self.dist.is_main:
            return None
        identity = self.bundle.identity
        if cfg.finetune_backbone:
            identity = write_backbone(self.bundle, self.key, self.cfg)
            self.heads.backbone = model_key(identity)
        heads_url = storage.join(cfg.output, HEADS)
        self.heads.to("cpu")
        meta = {"trained_by": "icar train-exits", "epochs": cfg.epochs, "finetune_backbone": cfg.finetune_backbone}
        if selected_epoch is not None:
            meta["selected_epoch"] = selected_epoch
        if calibration:  # for a mixed index: nothing in the heads' forward applies it (see EXIT_SCALES, EXIT_OFFSETS)
            meta[EXIT_SCALES] = json.dumps({str(e): r["scale"] for e, r in sorted(calibration.items())})
            meta[EXIT_OFFSETS] = json.dumps({str(e): r["offset"] for e, r in sorted(calibration.items())})
        write_output(heads_url, self.heads.to_bytes(meta), cfg)
        self.heads.path = heads_url
        doc = {
            "model": identity,
            "heads": self.heads.identity,
            "exits": self.exits,
            "recipe": "finetune_backbone (paper: 0.5/0.5 contrastive on both paths)" if cfg.finetune_backbone
            else "frozen backbone and text tower; heads only (contrastive in the "
                 f"{'mixed-depth' if cfg.mixed_gallery else 'own-depth'} gallery + distillation)",
            "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "storage_options"},
            "world_size": self.dist.world_size,
            "pairs": {"train": n_train, "val": n_val},
            "samples": {k: dataclasses.asdict(v) for k, v in self.reader.stats.items()},
            "before": {str(e): m for e, m in before.items()},
            "after": {str(e): m for e, m in after.items()},
            "history": history,
            "selected_epoch": selected_epoch,
            "exit_calibration": {str(e): r for e, r in sorted((calibration or {}).items())} or None,
            "selected_by": ("last epoch" if cfg.select_epoch == "last" else SELECTED_BY)
            if selected_epoch is not None else None,
            "seconds": seconds,
            "logit_scales": {k: float(v.detach().exp()) for k, v in self.trainer.log_scales.items()},
        }
        write_output(storage.join(cfg.output, METRICS), json.dumps(_jsonable(doc), indent=1).encode(), cfg)
        print(f"exit heads: {heads_url}\nvalidation ({n_val} pairs; before → after training):")
        print(format_table(before, after))
        print("mixed t2i R@1: recall in a gallery of every other image at that exit and the rest at full depth, "
              "as an index of routed rows holds them; exit|full: the caption's image at the exit, every other at "
              "full depth; full|exit: the reverse")
        for e, r in sorted((calibration or {}).items()):
            worst = max(r["val"], key=lambda v: v["penalty"])
            print(f"exit {e}: scores scale {r['scale']:.2f} x cosine {r['offset']:+.4f} in a mixed index (chosen on "
                  f"{r['pairs']} training pairs): mixed-gallery penalty at most {100 * r['penalty']:.1f} points of "
                  f"text->image R@1 there; on validation at most {100 * worst['penalty']:.1f} (95 % interval "
                  f"{100 * worst['penalty_interval'][0]:+.1f} to {100 * worst['penalty_interval'][1]:+.1f}, among "
                  f"{worst['images']} images); in the heads file as {EXIT_SCALES} and {EXIT_OFFSETS}")
        if selected_epoch is not None:
            print(f"heads of epoch {selected_epoch + 1}/{cfg.epochs} written (selected by "
                  f"{doc['selected_by']})")
        return doc

@dataclass
class _ValShare:
    """This process's validation pixels; captions' embeddings and groups of the whole split (stream order)."""

    pixels: np.ndarray  # uint8 (n_local, S, S, 3)
    assembly: Assembly
    text: torch.Tensor  # (N, D) L2-normalised


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    return x


def train_exits(cfg: ExitTrainConfig) -> dict | None:
    """Return the metrics document of a train-exits run (heads and metrics written under cfg.output).

    One process, or one of a data-parallel group when the environment describes one (torchrun); with
    ``cfg.workers`` > 1 outside such a group, starts that many local processes and returns rank 0's document.
    Inside a group, only rank 0 returns the document; the others return None. Workers are started with the
    "spawn" method, so a script that calls this with workers > 1 needs the usual ``if __name__ == "__main__":``.
    """
    if cfg.workers < 1:
        raise TrainExitsError(f"workers must be >= 1, got {cfg.workers}")
    world = distributed.env_world_size()
    if cfg.workers > 1 and world == 1:
        return _train_spawned(cfg)
    if cfg.workers > 1 and world != cfg.workers:
        raise TrainExitsError(f"--workers {cfg.workers} inside a group of {world} processes (torchrun sets "
                              f"WORLD_SIZE): use torchrun's --nproc-per-node or --workers, not both")
    try:
        with distributed.process_group(resolve_device(cfg.device)):
            return ExitTrainer(cfg).run()
    except distributed.DistributedError as e:
        raise TrainExitsError(str(e)) from e


def _spawned_worker(cfg: ExitTrainConfig) -> None:
    """What each process started by ``workers`` runs (module level: spawned processes import it by name)."""
    train_exits(cfg)


def _train_spawned(cfg: ExitTrainConfig) -> dict:
    """Run ``cfg`` in cfg.workers local processes; return the metrics document rank 0 wrote."""
    device = resolve_device(cfg.device)
    log.info("train-exits: starting %d worker processes (%s)", cfg.workers, distributed.backend_for(device))
    try:
        distributed.spawn(_spawned_worker, (cfg,), cfg.workers, device)
    except distributed.DistributedError as e:
        raise TrainExitsError(str(e)) from e
    except ProcessRaisedException as e:  # the child's traceback is text; its last line names the error
        last = [line for line in str(e).strip().splitlines() if line.strip()][-1]
        raise TrainExitsError(f"a training worker failed: {last.strip()} (its traceback is logged above)") from e
    except ProcessExitedException as e:
        raise TrainExitsError(f"a training worker died: {e}") from e
    return json.loads(read_output(storage.join(cfg.output, METRICS), cfg))

