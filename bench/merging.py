"""Benchmark: token merging composed with early exit, on the demo corpus's held-out test split, all from one run.

For the shipped demo CLIP (8 blocks, 64 px, patch 16: only 16 patch tokens + the class token) and its own
complexity scorer (what `icar embed --model demo` runs: the edge-density heuristic at the images' 64 px), on the
test split (never used to train the model, its heads, the routers or the scorer):

- full depth:              every image through all 8 blocks (profile ``8``);
- exits only:              the shipped router (pipeline/assets/demo/router.json: exits 4/6/8, calibrated to 0.75 of
                           full-depth GFLOPs on the val split);
- merging only:            every image at full depth with tokens merged by ``--merge`` (profile ``8@S``), no scorer;
- exits + merging:         ProfileRouter calibrated on the val split like ``icar calibrate --profiles P
                           --gflops-budget B`` (one row per ``--budgets`` entry; ``static`` is the static
                           tower's counted GFLOPs, the equal-GFLOPs comparison). P is chosen on the val split, not
                           on test: of the ``--candidates`` (exit depths × merge schedules), the profiles on the
                           recall@1-vs-GFLOPs Pareto front of val, leaving out those below
                           ``--min-profile-recall`` of full depth's val recall@1. Early exits of merged profiles use heads trained
                           under their schedule (``icar train-exits --merge S``, the shipped heads' recipe, cached
                           in --cache-dir);
- same mix, random:        the mix of the row above realised on test, assigned by a hash of the key instead of the
                           complexity score (no scorer runs: random routing does not need one);
- static smaller tower:    the honest baseline: an open_clip CLIP of the demo model's shape with only
                           ``--static-layers`` vision blocks (4 of 8: 0.53 × the demo tower's counted GFLOPs, about the
                           merged and routed rows' mean), trained from scratch exactly like the demo model (its
                           card's recipe and corpus: ``icar train-demo --model-json '{"vision_layers": 4}'``), run at
                           full depth with no scorer. ``--static-model DIR`` names it; when DIR holds no model it is
                           trained there first (~13 min of one CPU thread; the card it writes is checked against the
                           demo card's recipe, so a tower trained another way is refused).

For the trade-off figure (``--plot out.svg``, a self-contained SVG: recall@1 against measured speedup, one curve
per method) more points of each method are timed in the same run: exits only at ``--exit-budgets`` besides the
shipped router, merging only under every ``--merge-curve`` schedule, and the complexity and random routers at
every ``--budgets`` entry.

Quality: text→image recall@1/5/10 (identical captions form one query with all their images as hits). Every test
image is embedded once under every profile; a routing only picks which embedding each image keeps. Each row's
recall@1 minus the static tower's (and minus full depth's) comes with a 95% paired-bootstrap interval over the test
queries (``--bootstrap`` resamples): 1000 queries leave about ±2.5 points of noise on one recall@1, less on a
paired difference, and "ahead of the static tower" is claimed only where the interval excludes 0. That this
is what ``icar embed`` writes is checked: ``ModelWorker.embed`` with each variant's router on the same images.

Speed: ``ModelWorker.embed`` on the decoded test images (scorer, routing, pixel normalisation, adaptive
encoder with merging, fp16 output; JPEG decoding excluded) in batches of ``--batch-size``, one torch thread,
variants interleaved in alternating order over ``--repeats`` rounds; the median round gives images/s and the
speedup over full depth measured side by side. GFLOPs are counted (FlopCounterMode, scorer included). The
encoder alone (the same routed profiles, no scorer, no pixel conversion) is timed the same way, to separate what
the tower saves from what the scorer costs.

Because 17 tokens are too few for merging to show what it does at real sizes, ``--vit`` (default ViT-B-16, 197
tokens, random init: speed only, its recall means nothing) times the encoder alone on random pixels for a few
profiles, with each profile's counted GFLOP ratio and the share of it realised as speed.

    python -m bench.merging [--merge r2] [--budgets 0.45,static,0.6] [--json out.json] [--plot out.svg]
        [--static-model ~/.cache/icar/bench-merging/static-4l]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipeline.metrics import best_relevant_rank  # noqa: E402
from pipeline.model.spec import merge_spec, parse_merge, parse_profile, parse_profiles  # noqa: E402
from pipeline.training.recall import caption_groups, caption_queries, recall_table  # noqa: E402
from pipeline.demo.training import DemoModelConfig, DemoTrainConfig, train_demo  # noqa: E402
from pipeline.logs import setup_logging  # noqa: E402
from pipeline.model import flops, models  # noqa: E402
from pipeline.model import encoder as enc  # noqa: E402
from pipeline.model import router as routers  # noqa: E402
from pipeline.model.models import pixels_to_tensor  # noqa: E402
from pipeline.model.router import stable_unit_hash  # noqa: E402
from pipeline.report.html import escape, tick_label, ticks  # noqa: E402
from pipeline.model.scorer import scorer_for_model  # noqa: E402
from pipeline.model.spec import ModelSpec  # noqa: E402
from pipeline.model.worker import ModelWorker  # noqa: E402
from pipeline.training.exit_config import HEADS, ExitTrainConfig  # noqa: E402
from pipeline.training.exits import train_exits  # noqa: E402

log = logging.getLogger("bench.merging")
KS = (1, 5, 10)
DEMO = ROOT / "pipeline" / "assets" / "demo"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.merging", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default=str(ROOT.parent / "demo-corpus"), help="demo corpus (icar make-demo-corpus)")
    p.add_argument("--merge", default="r2", help="merge schedule of the main merging-only row (pipeline/model/merging.py)")
    p.add_argument("--candidates", default="4,6,4@keep0.8,6@keep0.8,6@r2,8@keep0.7,8@keep0.8,8@r2,8@keep0.9,8@r1,8",
                   help="profiles the router's set is chosen from (the val split's recall@1-vs-GFLOPs Pareto front)")
    p.add_argument("--min-profile-recall", type=float, default=0.9,
                   help="offer the router only profiles whose val recall@1 is at least this share of full depth's")
    p.add_argument("--budgets", default="0.45,static,0.6",
                   help="GFLOP budgets (× full depth) of exits + merging rows; 'static' is the static smaller tower's "
                        "counted GFLOPs (the equal-GFLOPs comparison)")
    p.add_argument("--batch-size", type=int, default=100, help="images per ModelWorker.embed call")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds over the test split")
    p.add_argument("--exit-budgets", default="0.6,0.9",
                   help="GFLOP budgets of further exits-only routers (curve points beside the shipped 0.75 router)")
    p.add_argument("--merge-curve", default="keep0.7,keep0.8,r1",
                   help="further merge schedules timed as merging-only rows (curve points beside --merge)")
    p.add_argument("--cache-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "icar", "bench-merging"),
                   help="where the merged heads and the static tower are trained once and reused")
    p.add_argument("--static-layers", type=int, default=4,
                   help="vision blocks of the static smaller tower (the demo model has 8)")
    p.add_argument("--static-model", default=None,
                   help="directory of the static smaller tower (trained there with the demo model's recipe when "
                        "absent; default: CACHE_DIR/static-<layers>l; 'none' leaves the row out)")
    p.add_argument("--test-limit", type=int, default=None, help="only the first N test (and val) images (smoke runs)")
    p.add_argument("--plot", default=None, help="write the recall@1-vs-speedup figure here (self-contained SVG)")
    p.add_argument("--from-json", default=None,
                   help="measure nothing: print the table and write --plot from an earlier run's --json file")
    p.add_argument("--vit", default="ViT-B-16", help="random-init open_clip ViT to time at a real token count "
                                                      "('' to skip)")
    p.add_argument("--vit-profiles", default="12,12@r8,12@r16,6,6@r16",
                   help="profiles to time on --vit (speed only)")
    p.add_argument("--vit-batch-size", type=int, default=8, help="images per forward pass on --vit")
    p.add_argument("--vit-repeats", type=int, default=3, help="timed rounds on --vit")
    p.add_argument("--bootstrap", type=int, default=2000,
                   help="paired bootstrap resamples of the test queries for the recall@1 differences' 95%% intervals")
    p.add_argument("--json", default=None, help="also write every number here")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------ pieces

def merged_heads(a: argparse.Namespace, schedule) -> str:
    """Return the path of exit heads trained under ``schedule`` with the shipped heads' recipe (trained once)."""
    recipe = json.loads((DEMO / "exit_heads.metrics.json").read_text())["config"]
    out = os.path.join(a.cache_dir, f"heads-{schedule.spec.replace(':', '_')}")
    path = os.path.join(out, HEADS)
    if os.path.exists(path):
        return path
    corpus = a.corpus
    keep = {k: recipe[k] for k in ("max_train", "max_val", "epochs", "batch_size", "lr", "weight_decay",
                                   "contrastive_weight", "distill_weight", "learn_temperature", "seed")}
    cfg = ExitTrainConfig(inputs=[os.path.join(corpus, "train", "*.tar")], output=out, model="demo",
                          val_inputs=[os.path.join(corpus, "val", "*.tar")], exits=[4, 6, 8], device="cpu",
                          merge=schedule.spec, **keep)
    log.info("training exit heads under %s (the shipped heads' recipe) into %s", schedule.spec, out)
    train_exits(cfg)
    return path


RECIPE_KEYS = ("epochs", "batch_size", "lr", "min_lr_ratio", "warmup_steps", "weight_decay", "grad_clip", "max_shift",
               "seed", "eval_images", "train_limit", "threads")


def static_tower(a: argparse.Namespace) -> str | None:
    """Return the directory of the static smaller tower: the demo model's recipe with fewer vision blocks.

    Trained with ``icar train-demo`` (pipeline.demo.training.train_demo) into the directory when it holds no model;
    an existing model whose card differs from the demo card's recipe in anything but the vision depth is refused.
    """
    if a.static_model is not None and a.static_model.lower() == "none":
        return None
    out = a.static_model or os.path.join(a.cache_dir, f"static-{a.static_layers}l")
    demo = json.loads((DEMO / "card.json").read_text())["train"]
    want_model = {**demo["model"], "vision_layers": a.static_layers}
    card_path = Path(out) / "card.json"
    if not (card_path.exists() and (Path(out) / "clip.safetensors").exists()):
        model = DemoModelConfig(**want_model)
        cfg = DemoTrainConfig(corpus=a.corpus, output=out, model=model, progress=False,
                              **{k: demo[k] for k in RECIPE_KEYS})
        log.info("training the static %d-block tower with the demo model's recipe into %s (about 13 min of one "
                 "CPU thread): icar train-demo --corpus %s --output %s --epochs %d --seed %d --threads %s "
                 "--model-json '{\"vision_layers\": %d}'", a.static_layers, out, a.corpus, out, cfg.epochs, cfg.seed,
                 cfg.threads, a.static_layers)
        train_demo(cfg)
    card = json.loads(card_path.read_text())["train"]
    differ = {k: (card.get(k), demo[k]) for k in RECIPE_KEYS if card.get(k) != demo[k]}
    for k, plain in (("full_caption_prob", 1.0), ("same_background_batches", 0.0)):  # the demo card predates them
        if card.get(k, plain) != plain:
            differ[k] = (card.get(k), plain)
    if card.get("model") != want_model:
        differ["model"] = (card.get("model"), want_model)
    if os.path.realpath(card.get("corpus", "")) != os.path.realpath(a.corpus):
        differ["corpus"] = (card.get("corpus"), a.corpus)
    if differ:
        raise SystemExit(f"--static-model {out} was not trained like the demo model with {a.static_layers} vision "
                         f"blocks (card vs wanted: {differ}); remove it (it is retrained) or name another directory")
    return out


def embed_profiles(encoder, bundle, pixels: np.ndarray, profiles, batch: int = 200) -> dict[str, np.ndarray]:
    """Return {profile spec: float32 L2-normalised embeddings (N, D)} with every image under every profile."""
    import torch

    out: dict[str, list] = {p.spec: [] for p in profiles}
    with torch.inference_mode():
        for i in range(0, len(pixels), batch):
            x = pixels_to_tensor(bundle, pixels[i:i + batch])
            for sched in encoder.schedules:
                wanted = [p for p in profiles if merge_spec(p.merge) == merge_spec(sched)]
                if wanted:
                    every = encoder.forward_all_exits(x, sched)
                    for p in wanted:
                        out[p.spec].append(every[p.exit].float().numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


class HashProfileRouter:
    """Routes to profiles by a stable hash of the key with fixed shares (random routing at a known mix)."""

    needs_scores = False

    def __init__(self, profiles: list[str], fractions: list[float], heads: dict):
        self.profiles, self.fractions, self.heads = list(profiles), list(fractions), dict(heads)
        self._edges = np.cumsum(self.fractions)[:-1]

    def route_profiles(self, scores, keys) -> np.ndarray:
        return np.searchsorted(self._edges, stable_unit_hash(keys, "bench-merging"), side="right").astype(np.int16)

    def route(self, scores, keys):
        return np.asarray([int(p.split("@")[0]) for p in self.profiles], np.int16)[self.route_profiles(scores, keys)]

    def to_dict(self) -> dict:
        return {"kind": "hash-profile (bench only)", "profiles": self.profiles, "fractions": self.fractions}


def recall_row(text, groups, chosen: np.ndarray) -> dict:
    return recall_table(text, chosen, groups)["t2i"]


def hits_at_1(text: np.ndarray, images: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Return, per text query (one per distinct caption, as ``recall_row`` forms them), whether its top image is a hit.

    The mean is ``recall_row(...)[1]``; kept per query so two methods can be compared on the same queries.
    """
    first, images_of = caption_queries(groups)
    return best_relevant_rank(text[first] @ images.T, images_of) < 1


def routed_gallery(chosen: np.ndarray, emb: dict[str, np.ndarray]) -> np.ndarray:
    """Return the embeddings an index holds when image i is embedded under profile ``chosen[i]``."""
    table = np.empty_like(next(iter(emb.values())))
    for p in set(chosen.tolist()):
        table[chosen == p] = emb[p][chosen == p]
    return table


def paired_interval(a: np.ndarray, b: np.ndarray, resamples: int, seed: int = 0) -> dict:
    """Return {"diff", "lo", "hi"}: mean(a) - mean(b) and its 95% paired-bootstrap interval over the queries.

    ``a``/``b``: per-query hits of two methods on the same queries; each resample draws queries with replacement
    and takes both methods' hits on them, so what the two share (easy and hard queries) cancels.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    d = a - b
    rng = np.random.default_rng(seed)
    means = np.array([d[rng.integers(0, len(d), len(d))].mean() for _ in range(max(0, resamples))])
    lo, hi = (np.percentile(means, [2.5, 97.5]) if len(means) else (float("nan"), float("nan")))
    return {"diff": float(d.mean()), "lo": float(lo), "hi": float(hi), "resamples": int(resamples)}


def parse_budgets(spec: str, static_fraction: float | None) -> list[float]:
    """Return the GFLOP budgets of ``--budgets``; ``static`` stands for the static tower's GFLOPs fraction."""
    out = []
    for b in (x.strip() for x in spec.split(",")):
        if not b:
            continue
        if b == "static":
            if static_fraction is None:
                raise SystemExit("--budgets names 'static' but there is no static tower (--static-model none)")
            out.append(static_fraction)
        else:
            out.append(float(b))
    return out


# ------------------------------------------------------------------------------------------------ run

def run(a: argparse.Namespace) -> dict:
    import torch

    from bench.common import load_average, machine_facts
    from bench.quality import read_split

    torch.set_num_threads(1)
    facts = machine_facts()
    schedule = parse_merge(a.merge)
    if schedule is None:
        raise SystemExit("--merge must name a schedule (e.g. keep0.8); 'none' leaves nothing to benchmark")
    s = schedule.spec
    candidates = parse_profiles(a.candidates)
    doc = json.loads((Path(a.corpus) / "corpus.json").read_text())
    os.makedirs(a.cache_dir, exist_ok=True)
    os.environ.setdefault("ICAR_CACHE_DIR", a.cache_dir)

    bundle = models.load_clip("demo", None)
    heads = enc.ExitHeads.load(str(DEMO / "exit_heads.safetensors"), bundle)
    # heads for every schedule an early exit is merged under (full-depth profiles use the tower's own head)
    early_scheds = list(dict.fromkeys(p.merge for p in candidates if p.merge and p.exit < bundle.num_blocks))
    mh_paths = {sc.spec: merged_heads(a, sc) for sc in early_scheds}
    mhs = {k: enc.ExitHeads.load(v, bundle) for k, v in mh_paths.items()}
    scorer = scorer_for_model("demo", "default", image_size=bundle.image_size)  # what `icar embed` scores with
    static_dir = static_tower(a)  # first: training it (when absent) needs the CPU the timing below must not share
    sb = models.load_clip(static_dir) if static_dir is not None else None
    budgets = parse_budgets(a.budgets, None if sb is None else
                            flops.exit_gflops(sb, [sb.num_blocks])[sb.num_blocks] / flops.profile_cost(
                                bundle, parse_profile(str(bundle.num_blocks))))
    _, val_px, val_caps = read_split(a.corpus, doc, "val", bundle.image_size, a.test_limit)
    keys, px, caps = read_split(a.corpus, doc, "test", bundle.image_size, a.test_limit)
    text = models.encode_text(bundle, caps)
    groups = caption_groups(caps)
    val_scores = np.concatenate([scorer.score(val_px[i:i + 200]) for i in range(0, len(val_px), 200)])
    test_scores = np.concatenate([scorer.score(px[i:i + 200]) for i in range(0, len(px), 200)])

    # every profile any row uses, embedded once
    shipped = routers.load_router(str(DEMO / "router.json"))
    curve_scheds = [parse_merge(m).spec for m in a.merge_curve.split(",") if m.strip()]
    every = parse_profiles(list(dict.fromkeys(
        ["8", "4", "6", f"8@{s}"] + [f"8@{c}" for c in curve_scheds] + [p.spec for p in candidates])))
    encoder = enc.AdaptiveEncoder(bundle.model.visual, [4, 6, 8], heads, [p.merge for p in every if p.merge],
                                  mhs).eval()
    costs = {p.spec: flops.profile_cost(bundle, p) for p in every}
    full_g = costs["8"]
    # the router's profiles: the val split's Pareto front of recall@1 against counted GFLOPs
    val_emb = embed_profiles(encoder, bundle, val_px, candidates)
    val_text, val_groups = models.encode_text(bundle, val_caps), caption_groups(val_caps)
    val_r1 = {p: recall_row(val_text, val_groups, e)[1] for p, e in val_emb.items()}
    floor = a.min_profile_recall * val_r1.get("8", 0.0)

    def front(pool):
        """The val split's recall@1-vs-GFLOPs Pareto front of ``pool`` above the floor, ending at full depth."""
        out, best = [], -1.0
        for p in sorted(pool, key=lambda p: costs[p.spec]):
            if (val_r1[p.spec] > best and val_r1[p.spec] >= floor) or p.spec == "8":
                out.append(p)
                best = max(best, val_r1[p.spec])
        return out

    profiles = front(candidates)
    if profiles[-1].spec != "8":
        raise SystemExit(f"--candidates must hold the unmerged full depth 8, got {a.candidates}")
    log.info("val Pareto front of all candidates: %s", [p.spec for p in profiles])
    # A router's profiles share one merge schedule (plus unmerged ones): schedules never share a forward, so each
    # further schedule in a batch is another pass through the blocks with fewer rows (on the demo, a batch split
    # between two schedules ran ~10% slower than either alone). One family per schedule; at each budget the
    # family whose calibrated router has the best val recall@1 is used.
    families = {}
    for sched in dict.fromkeys(merge_spec(p.merge) for p in candidates if p.merge is not None):
        fam = front([p for p in candidates if merge_spec(p.merge) in (sched, "none")])
        if len({merge_spec(p.merge) for p in fam}) > 1:  # holds a merged profile above the floor
            families[sched] = fam
    log.info("router families (val Pareto front per schedule): %s",
             {k: [p.spec for p in v] for k, v in families.items()})
    emb = embed_profiles(encoder, bundle, px, every)

    workdir = Path(a.cache_dir) / "routers"
    workdir.mkdir(parents=True, exist_ok=True)
    variants = []  # (name, router file or None, spec kwargs, chosen profile per test image, note)

    def add(name, chosen, router_file=None, spec_kwargs=None, router_obj=None, scorer_cost=True, note="",
            method=""):
        variants.append({"name": name, "chosen": np.asarray(chosen), "router_file": router_file,
                         "spec": spec_kwargs or {}, "router_obj": router_obj, "scorer": scorer_cost, "note": note,
                         "method": method})

    add("full depth", ["8"] * len(px), spec_kwargs={"full_depth": True, "scorer": "none"}, scorer_cost=False,
        method="full depth")
    depth = shipped.route(test_scores, keys)
    add("exits only (shipped router, budget 0.75)", [str(int(d)) for d in depth], router_file=str(DEMO / "router.json"),
        note="ThresholdRouter 4/6/8", method="exits only")
    exit_costs = {e: costs[str(e)] for e in (4, 6, 8)}
    for budget in [float(b) for b in a.exit_budgets.split(",") if b.strip()]:
        r = routers.calibrate_budget(val_scores, [4, 6, 8], exit_costs, scorer.gflops_per_image, budget,
                                     scorer_identity=scorer.identity,
                                     budget_confidence=routers.DEFAULT_BUDGET_CONFIDENCE)
        path = workdir / f"exits-{budget:g}.json"
        routers.save_router(r, str(path))
        add(f"exits only (budget {budget:g})", [str(int(d)) for d in r.route(test_scores, keys)],
            router_file=str(path), note="ThresholdRouter 4/6/8", method="exits only")
    for sc in list(dict.fromkeys([s] + curve_scheds)):
        path = workdir / f"merge-only-{sc.replace(':', '_')}.json"
        routers.save_router(routers.ProfileRouter([f"8@{sc}"], []), str(path))
        add(f"merging only (8@{sc})", [f"8@{sc}"] * len(px), router_file=str(path), spec_kwargs={"scorer": "none"},
            scorer_cost=False, method="merging only")
    family_choice = {}
    for budget in budgets:
        tried = {}
        for sched, fam in families.items():
            try:
                cand = routers.calibrate_profiles_budget(val_scores, [p.spec for p in fam], costs,
                                                         scorer.gflops_per_image, budget,
                                                         scorer_identity=scorer.identity,
                                                         budget_confidence=routers.DEFAULT_BUDGET_CONFIDENCE)
            except ValueError as e:  # this family's cheapest profile costs more than the budget
                log.info("budget %.3g: family %s left out: %s", budget, sched, e)
                continue
            val_chosen = np.asarray(cand.profiles)[cand.route_profiles(val_scores)]
            tried[sched] = (recall_row(val_text, val_groups, routed_gallery(val_chosen, val_emb))[1], cand)
        if not tried:
            raise SystemExit(f"no router family reaches a GFLOPs budget of {budget:.3g}; raise it or offer cheaper "
                             f"--candidates")
        best_sched = max(tried, key=lambda k: tried[k][0])
        family_choice[f"{budget:.3g}"] = {k: v[0] for k, v in tried.items()} | {"chosen": best_sched}
        log.info("budget %.3g: val recall@1 per router family %s; using %s", budget,
                 {k: round(v[0], 3) for k, v in tried.items()}, best_sched)
        r = tried[best_sched][1]
        r.heads.update({k: v for k, v in mh_paths.items() if any(
            merge_spec(p.merge) == k and p.exit < 8 for p in r.profile_list)})
        path = workdir / f"profiles-{budget:g}.json"
        routers.save_router(r, str(path))
        chosen = np.asarray(r.profiles)[r.route_profiles(test_scores)]
        add(f"exits + merging, complexity router (budget {budget:.3g})", chosen, router_file=str(path),
            note=" ".join(r.profiles), method="exits + merging, complexity router")
        mix = [float(np.mean(chosen == p)) for p in r.profiles]
        rnd = HashProfileRouter(r.profiles, mix, r.heads)
        add(f"same mix, random routing (budget {budget:.3g})", np.asarray(r.profiles)[rnd.route_profiles(None, keys)],
            router_file=str(path), router_obj=rnd, spec_kwargs={"scorer": "none"}, scorer_cost=False,
            note="hash of the key; no scorer", method="exits + merging, random routing")

    # quality and counted cost of every row
    rows, hits = [], []  # hits: per-query hits at 1, for paired intervals of recall@1 differences
    for v in variants:
        chosen = v["chosen"]
        table = routed_gallery(chosen, emb)
        hits.append(hits_at_1(text, table, groups))
        g = float(np.mean([costs[c] for c in chosen])) + (scorer.gflops_per_image if v["scorer"] else 0.0)
        rows.append({"name": v["name"], "t2i": recall_row(text, groups, table), "gflops": g,
                     "gflops_fraction": g / full_g,
                     "mix": {p: float(np.mean(chosen == p)) for p in sorted(set(chosen.tolist()), key=costs.get)},
                     "note": v["note"]})
    static = None
    if static_dir is not None:  # its own text tower embeds the same captions; no scorer, full depth
        if sb.image_size != bundle.image_size:
            raise SystemExit(f"--static-model {static_dir} takes {sb.image_size} px images, the demo model "
                             f"{bundle.image_size}: train it with the demo model's image size")
        static_g = flops.exit_gflops(sb, [sb.num_blocks])[sb.num_blocks]
        with torch.inference_mode():
            s_emb = np.concatenate([torch.nn.functional.normalize(sb.model.encode_image(
                models.pixels_to_tensor(sb, px[i:i + 200])).float(), dim=-1).numpy() for i in range(0, len(px), 200)])
        static = {"dir": static_dir, "blocks": sb.num_blocks, "emb": s_emb, "text": models.encode_text(sb, caps),
                  "card": json.loads((Path(static_dir) / "card.json").read_text())}
        variants.append({"name": f"static smaller tower ({sb.num_blocks} of {bundle.num_blocks} blocks, trained like "
                                 f"the demo model)", "chosen": np.asarray([str(sb.num_blocks)] * len(px)),
                         "router_file": None, "spec": {"full_depth": True, "scorer": "none", "model": static_dir,
                                                       "exits": [sb.num_blocks]},
                         "router_obj": None, "scorer": False, "note": static_dir, "method": "static smaller tower"})
        rows.append({"name": variants[-1]["name"], "t2i": recall_row(static["text"], groups, s_emb),
                     "gflops": static_g, "gflops_fraction": static_g / full_g, "mix": {str(sb.num_blocks): 1.0},
                     "note": f"{static_dir}; val recall@1 {static['card']['metrics']['val']['full']['t2i_r1']:.3f} "
                             f"in its card"})
    for r, v in zip(rows, variants):
        r["method"] = v["method"]
    full_recall = rows[0]["t2i"]
    for r in rows:
        r["pct_of_full"] = {k: 100.0 * r["t2i"][k] / full_recall[k] for k in KS}
    if static is not None:
        hits.append(hits_at_1(static["text"], static["emb"], groups))
    for i, (r, h) in enumerate(zip(rows, hits)):
        r["r1_vs_full"] = paired_interval(h, hits[0], a.bootstrap)
        if static is not None:
            r["r1_vs_static"] = paired_interval(h, hits[-1], a.bootstrap)
        if r["method"] == "exits + merging, complexity router":  # its random-routing twin comes next
            r["r1_vs_random"] = paired_interval(h, hits[i + 1], a.bootstrap)

    # the pipeline check and the timing: the real ModelWorker per variant
    workers = []
    for v in variants:
        spec = ModelSpec(model=v["spec"].get("model", "demo"), device="cpu", torch_threads=1,
                         scorer=v["spec"].get("scorer", "default"), exits=v["spec"].get("exits"),
                         router=None if v["spec"].get("full_depth") else v["router_file"],
                         full_depth=bool(v["spec"].get("full_depth")))
        if v["router_obj"] is not None:  # built with the calibrated router's profiles, then routed by hash
            spec.scorer = "default"
            w = ModelWorker(spec)
            w.router = v["router_obj"]
            w.drop_scorer()
        else:
            w = ModelWorker(spec)
        workers.append(w)
    checks = []
    for v, w in zip(variants, workers):
        out = w.embed(px[:200], keys[:200])
        chosen = v["chosen"][:200]
        if v["method"] == "static smaller tower":
            want = static["emb"][:200]
        else:
            want = np.stack([emb[c][i] for i, c in enumerate(chosen)])
        checks.append(float(np.abs(out["embedding"].astype(np.float32) - want).max()))

    tensors = [pixels_to_tensor(bundle, px[j:j + a.batch_size]) for j in range(0, len(px), a.batch_size)]
    routed = []  # per variant, per batch: (exit depths, merge ids) as its worker's encoder takes them
    for v, w in zip(variants, workers):
        ids = {merge_spec(sc): i for i, sc in enumerate(w.encoder.schedules)}
        prof = [parse_profile(c) for c in v["chosen"]]
        d = torch.as_tensor([p.exit for p in prof])
        m = torch.as_tensor([ids[merge_spec(p.merge)] for p in prof])
        routed.append([(d[j:j + a.batch_size], m[j:j + a.batch_size]) for j in range(0, len(px), a.batch_size)])
    load_before = load_average()
    times = [[] for _ in variants]
    enc_times = [[] for _ in variants]
    order = list(range(len(variants)))
    for rnd in range(a.repeats):
        for i in (order if rnd % 2 == 0 else order[::-1]):
            t0 = time.perf_counter()
            for j in range(0, len(px), a.batch_size):
                workers[i].embed(px[j:j + a.batch_size], keys[j:j + a.batch_size])
            times[i].append(time.perf_counter() - t0)
            with torch.inference_mode():
                t0 = time.perf_counter()
                for x, (d, m) in zip(tensors, routed[i]):
                    workers[i].encoder(x, d, m)
                enc_times[i].append(time.perf_counter() - t0)
    load_after = load_average()
    base, enc_base = statistics.median(times[0]), statistics.median(enc_times[0])
    for r, t, et, c in zip(rows, times, enc_times, checks):
        r["images_per_s"] = len(px) / statistics.median(t)
        r["speedup"] = base / statistics.median(t)
        r["encoder_images_per_s"] = len(px) / statistics.median(et)
        r["encoder_speedup"] = enc_base / statistics.median(et)
        r["gflop_speedup"] = 1.0 / r["gflops_fraction"]
        r["max_abs_diff_vs_embed"] = c
    result = {"facts": facts, "static_model": None if static is None else {
                  "dir": static["dir"], "blocks": static["blocks"], "recipe": static["card"]["train"],
                  "parameters": static["card"]["parameters"], "val_full": static["card"]["metrics"]["val"]["full"]},
              "load_average_during": [load_before, load_after], "merge": s,
              "profiles": [p.spec for p in profiles], "gflops_per_profile": costs, "rows": rows,
              "router_families": {k: [p.spec for p in v] for k, v in families.items()},
              "router_family_val_recall_at_1": family_choice,
              "val_recall_at_1": val_r1, "test_images": len(px), "merged_heads": mh_paths,
              "tokens": {p.spec: flops.tower_profile(bundle, p.merge)["tokens"] for p in every}}
    if a.vit:
        result["vit"] = time_vit(a)
    return result


def time_vit(a: argparse.Namespace) -> dict:
    """Return images/s of the adaptive encoder alone on a random-init ViT under each of --vit-profiles."""
    import torch

    bundle = models.load_clip(a.vit, "none", seed=0)
    profiles = parse_profiles(a.vit_profiles)
    encoder = enc.AdaptiveEncoder(bundle.model.visual, sorted({p.exit for p in profiles} | {bundle.num_blocks}),
                                  None, [p.merge for p in profiles if p.merge]).eval()
    ids = {merge_spec(sc): i for i, sc in enumerate(encoder.schedules)}
    x = torch.randn(a.vit_batch_size, 3, bundle.image_size, bundle.image_size,
                    generator=torch.Generator().manual_seed(0))
    times = {p.spec: [] for p in profiles}
    with torch.inference_mode():
        for p in profiles:  # warm-up
            encoder(x[:1], torch.full((1,), p.exit), torch.full((1,), ids[merge_spec(p.merge)]))
        for rnd in range(a.vit_repeats):
            for p in (profiles if rnd % 2 == 0 else profiles[::-1]):
                d = torch.full((len(x),), p.exit)
                m = torch.full((len(x),), ids[merge_spec(p.merge)])
                t0 = time.perf_counter()
                encoder(x, d, m)
                times[p.spec].append(time.perf_counter() - t0)
    first = profiles[0].spec
    costs = {p.spec: flops.profile_cost(bundle, p) for p in profiles}
    rows = []
    for p in profiles:
        speed = statistics.median(times[first]) / statistics.median(times[p.spec])
        allowed = costs[first] / costs[p.spec]
        rows.append({"profile": p.spec, "gflops": costs[p.spec], "images_per_s": len(x) / statistics.median(times[p.spec]),
                     "speedup": speed, "gflop_speedup": allowed, "realised": speed / allowed,
                     "tokens_last_block": flops.tower_profile(bundle, p.merge)["tokens"][p.exit]})
    return {"model": a.vit, "pretrained": "none (random init: speed only)", "batch_size": a.vit_batch_size,
            "repeats": a.vit_repeats, "rows": rows}


def format_report(r: dict) -> str:
    f = r["facts"]
    lines = [f"# {f['date']}  {f['cpu_count']} CPUs ({f['cpu']}), torch {f['torch']}, icar {f['git']}",
             f"# load average before/after timing: {r['load_average_during'][0]} / {r['load_average_during'][1]}",
             f"# demo CLIP, {r['test_images']} held-out test images; val Pareto front of all candidates: "
             f"{', '.join(r['profiles'])}",
             *(["# router families (val Pareto front per schedule): " + "; ".join(
                 f"{k}: {', '.join(v)}" for k, v in r["router_families"].items()),
                "# val recall@1 of each family's router per budget: " + "; ".join(
                 f"{b}: " + ", ".join(f"{k} {v:.3f}" for k, v in d.items() if k != "chosen") + f" -> {d['chosen']}"
                 for b, d in r["router_family_val_recall_at_1"].items())] if r.get("router_families") else []),
             *([f"# static smaller tower: {r['static_model']['dir']} ({r['static_model']['blocks']} blocks, "
                f"{r['static_model']['parameters']} parameters, trained like the demo model: epochs "
                f"{r['static_model']['recipe']['epochs']}, batch {r['static_model']['recipe']['batch_size']}, "
                f"seed {r['static_model']['recipe']['seed']}, threads {r['static_model']['recipe']['threads']})"]
               if r.get("static_model") else []),
             "# tokens entering each block, and leaving the last: " + "; ".join(
                 f"{k.split('@')[1]} {v}" for k, v in r["tokens"].items() if k.startswith("8@")),
             "",
             "| method | R@1 | R@5 | R@10 | R@1 / R@10 % of full | R@1 − static tower's (95% CI) "
             "| GFLOPs/img (× full) | images/s (scorer incl.) | speedup | encoder alone speedup | mix |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        t, pct = row["t2i"], row["pct_of_full"]
        mix = ", ".join(f"{k} {v:.0%}" for k, v in row["mix"].items())
        vs = row.get("r1_vs_static")
        vs = "" if vs is None or row.get("method") == "static smaller tower" else \
            f"{vs['diff']:+.3f} ({vs['lo']:+.3f}, {vs['hi']:+.3f})"
        lines.append(f"| {row['name']} | {t[1]:.3f} | {t[5]:.3f} | {t[10]:.3f} | {pct[1]:.1f} / {pct[10]:.1f} | "
                     f"{vs} | {row['gflops']:.4f} ({row['gflops_fraction']:.3f}) | {row['images_per_s']:.0f} | "
                     f"{row['speedup']:.2f}× | {row['encoder_speedup']:.2f}× | {mix} |")
    twins = [(row["name"].split("(")[-1].rstrip(")"), row["r1_vs_random"]) for row in r["rows"]
             if row.get("r1_vs_random")]
    if twins:
        lines.append("\ncomplexity router − the same mix routed at random, recall@1 (95% paired-bootstrap interval): "
                     + "; ".join(f"{b}: {d['diff']:+.3f} ({d['lo']:+.3f}, {d['hi']:+.3f})" for b, d in twins))
    worst = max(row["max_abs_diff_vs_embed"] for row in r["rows"])
    lines.append(f"\npipeline check: ModelWorker.embed (float16) vs the per-profile embeddings, max |diff| {worst:.1e}")
    if "vit" in r:
        v = r["vit"]
        lines += ["", f"{v['model']} ({v['pretrained']}), encoder alone, batch {v['batch_size']}, "
                      f"median of {v['repeats']} interleaved rounds:", "",
                  "| profile | tokens after last block | GFLOPs/img | images/s | speedup | GFLOP-allowed | realised |",
                  "|---|---|---|---|---|---|---|"]
        for row in v["rows"]:
            lines.append(f"| {row['profile']} | {row['tokens_last_block']} | {row['gflops']:.2f} | "
                         f"{row['images_per_s']:.2f} | {row['speedup']:.2f}× | {row['gflop_speedup']:.2f}× | "
                         f"{row['realised']:.2f} |")
    return "\n".join(lines)


METHOD_STYLE = {  # method: (colour, marker) in the trade-off figure
    "exits only": ("#3b6fb6", "circle"),
    "merging only": ("#1f9e89", "square"),
    "exits + merging, complexity router": ("#e07b39", "diamond"),
    "exits + merging, random routing": ("#9a6fb0", "triangle"),
    "static smaller tower": ("#c0392b", "star"),
    "full depth": ("#333333", "cross"),
}


def _marker(kind: str, x: float, y: float, colour: str, tip: str) -> str:
    r = 4.5
    if kind == "circle":
        shape = f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r}"'
    elif kind == "square":
        shape = f'<rect x="{x - r:.1f}" y="{y - r:.1f}" width="{2 * r}" height="{2 * r}"'
    else:
        pts = {"diamond": [(0, -1.3), (1.1, 0), (0, 1.3), (-1.1, 0)],
               "triangle": [(0, -1.3), (1.2, 0.9), (-1.2, 0.9)],
               "star": [(0.0, -1.6), (0.38, -0.5), (1.5, -0.5), (0.6, 0.2), (0.95, 1.3), (0.0, 0.65), (-0.95, 1.3),
                        (-0.6, 0.2), (-1.5, -0.5), (-0.38, -0.5)],
               "cross": [(-0.35, -1.2), (0.35, -1.2), (0.35, -0.35), (1.2, -0.35), (1.2, 0.35), (0.35, 0.35),
                         (0.35, 1.2), (-0.35, 1.2), (-0.35, 0.35), (-1.2, 0.35), (-1.2, -0.35), (-0.35, -0.35)]}[kind]
        shape = '<polygon points="' + " ".join(f"{x + dx * r:.1f},{y + dy * r:.1f}" for dx, dy in pts) + '"'
    return f'{shape} fill="{colour}" stroke="#fff" stroke-width="0.8"><title>{escape(tip)}</title></{shape.split()[0][1:]}>'


def plot_tradeoff(r: dict) -> str:
    """Return a self-contained SVG: text→image recall@1 against measured speedup over full depth, a curve per method.

    Every point is a row of ``r["rows"]`` (one run); a method's points are joined in order of counted GFLOPs (its
    knob: budget or schedule).
    """
    rows = [row for row in r["rows"] if row.get("method")]
    xs = [row["speedup"] for row in rows] + [1.0]
    ys = [row["t2i"][1] for row in rows]
    xt = ticks(min(xs) * 0.95, max(xs) * 1.05, 6)
    yt = ticks(min(ys) - 0.01, max(ys) + 0.01, 6)
    w, h, left, right, top, bottom = 760, 480, 64, 250, 58, 52
    pw, ph = w - left - right, h - top - bottom

    def X(v):
        return left + (v - xt[0]) / (xt[-1] - xt[0]) * pw

    def Y(v):
        return top + (1 - (v - yt[0]) / (yt[-1] - yt[0])) * ph

    f = r["facts"]
    loads = " before, ".join(", ".join(f"{v:.1f}" for v in la) for la in r["load_average_during"]) + " after timing"
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w} {h}" width="{w}" height="{h}" '
           f'font-family="Helvetica, Arial, sans-serif" font-size="11">',
           "<title>ICAR token merging: recall@1 vs measured speedup</title>",
           f'<rect width="{w}" height="{h}" fill="#ffffff"/>',
           f'<text x="{left}" y="18" font-size="13" font-weight="bold">Demo CLIP, {r["test_images"]} held-out test '
           f'images: text→image recall@1 vs measured speedup</text>',
           f'<text x="{left}" y="32" fill="#555">{escape(f["date"])}, icar {escape(f["git"])}, one torch thread, '
           f'{f["cpu_count"]} shared CPUs; load average (1, 5, 15 min) {loads}</text>',
           f'<text x="{left}" y="{top - 4}" fill="#555">speedup: images/s of ModelWorker.embed (scorer included) '
           f'÷ that of full depth, timed side by side in the same run</text>']
    for v in yt:
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{Y(v):.1f}" y2="{Y(v):.1f}" stroke="#e3e3e3"/>'
                   f'<text x="{left - 6}" y="{Y(v) + 3.5:.1f}" text-anchor="end" fill="#444">{tick_label(v)}</text>')
    for v in xt:
        out.append(f'<line x1="{X(v):.1f}" x2="{X(v):.1f}" y1="{top}" y2="{top + ph}" stroke="#f0f0f0"/>'
                   f'<text x="{X(v):.1f}" y="{top + ph + 16}" text-anchor="middle" fill="#444">'
                   f'{tick_label(v)}×</text>')
    out.append(f'<line x1="{X(1.0):.1f}" x2="{X(1.0):.1f}" y1="{top}" y2="{top + ph}" stroke="#999" '
               f'stroke-dasharray="3,3"/>')
    full = r["rows"][0]["t2i"][1]
    out.append(f'<line x1="{left}" x2="{left + pw}" y1="{Y(full):.1f}" y2="{Y(full):.1f}" stroke="#999" '
               f'stroke-dasharray="3,3"/>')
    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>')
    out.append(f'<text x="{left + pw / 2:.1f}" y="{h - 12}" text-anchor="middle">measured speedup over full depth '
               f'(images/s ratio, scorer included)</text>')
    out.append(f'<text transform="translate(16,{top + ph / 2:.1f}) rotate(-90)" text-anchor="middle">text→image '
               f'recall@1</text>')
    legend_y = top + 6
    for method, (colour, marker) in METHOD_STYLE.items():
        pts = sorted((row for row in rows if row["method"] == method), key=lambda row: row["gflops"])
        if not pts:
            continue
        if len(pts) > 1:
            out.append('<polyline fill="none" stroke="' + colour + '" stroke-width="1.6" points="' + " ".join(
                f'{X(p["speedup"]):.1f},{Y(p["t2i"][1]):.1f}' for p in pts) + '"/>')
        for p in pts:
            tip = (f'{p["name"]}: recall@1 {p["t2i"][1]:.3f}, {p["speedup"]:.2f}× measured, '
                   f'{p["gflops_fraction"]:.2f} × full GFLOPs')
            out.append(_marker(marker, X(p["speedup"]), Y(p["t2i"][1]), colour, tip))
            label = p["name"].split("budget ")[-1].rstrip(")") if "budget " in p["name"] else \
                p["name"].split("8@")[-1].rstrip(")") if "8@" in p["name"] else ""
            if label:
                out.append(f'<text x="{X(p["speedup"]) + 6:.1f}" y="{Y(p["t2i"][1]) - 5:.1f}" fill="{colour}" '
                           f'font-size="9">{escape(label)}</text>')
        lx = left + pw + 16
        out.append(_marker(marker, lx, legend_y, colour, method))
        out.append(f'<text x="{lx + 10}" y="{legend_y + 4}">{escape(method)}</text>')
        detail = {"exits only": "budgets " + ", ".join(p["name"].split("budget ")[-1].rstrip(")") for p in pts),
                  "merging only": "8@" + ", 8@".join(p["name"].split("8@")[-1].rstrip(")") for p in pts)}.get(method)
        if method.startswith("exits + merging"):
            detail = "budgets " + ", ".join(p["name"].split("budget ")[-1].rstrip(")") for p in pts)
        if method == "static smaller tower":
            detail = f'{r["static_model"]["blocks"]} blocks, {pts[0]["gflops_fraction"]:.2f} × GFLOPs'
        if detail:
            out.append(f'<text x="{lx + 10}" y="{legend_y + 17}" fill="#666" font-size="10">{escape(detail)}</text>')
        legend_y += 36
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    a = parse_args(argv)
    if a.from_json:
        r = json.loads(Path(a.from_json).read_text())
        for row in r["rows"]:  # JSON made the recall@k keys strings
            row["t2i"] = {int(k): v for k, v in row["t2i"].items()}
            row["pct_of_full"] = {int(k): v for k, v in row["pct_of_full"].items()}
    else:
        r = run(a)
    print(format_report(r))
    if a.json and not a.from_json:
        Path(a.json).write_text(json.dumps(r, indent=1, default=float))
    if a.plot:
        tmp = a.plot + ".tmp"
        Path(tmp).write_text(plot_tradeoff(r))
        os.replace(tmp, a.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
