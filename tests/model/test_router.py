"""Routers and their calibration: semantics, determinism, JSON round trips, budgets met on held-out samples."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from pipeline.model import router as R
from pipeline.model import scorer_identity

# ViT-L-14-like costs (ANCHORS.md: 0.31 + 6.737·k GFLOPs) and a ConvNeXt-atto-like scorer.
GFLOPS = {k: 0.31 + 6.737 * k for k in (8, 12, 16, 18, 20, 24)}
SCORER = 1.09


def test_threshold_router_boundaries_nan_and_dtype():
    r = R.ThresholdRouter([6, 9, 12], [0.3, 0.6])
    depth = r.route(np.array([0.0, 0.3, 0.30001, 0.6, 0.61, 1.0, np.nan]), list("abcdefg"))
    assert depth.dtype == np.int16
    assert depth.tolist() == [6, 6, 9, 9, 12, 12, 12]
    assert r.nan_routed == 1
    assert R.ThresholdRouter([12], []).route(np.array([0.9]), ["x"]).tolist() == [12]


def test_router_arguments_are_checked():
    with pytest.raises(ValueError, match="need 2 thresholds"):
        R.ThresholdRouter([6, 9, 12], [0.5])
    with pytest.raises(ValueError, match="non-decreasing"):
        R.ThresholdRouter([6, 9, 12], [0.6, 0.5])
    with pytest.raises(ValueError, match="increasing order"):
        R.ThresholdRouter([12, 6], [0.5])
    with pytest.raises(ValueError, match="sum to 1"):
        R.FractionRouter([6, 12], [0.5, 0.6])
    with pytest.raises(ValueError, match="one fraction per exit"):
        R.FractionRouter([6, 12], [1.0])


def test_fraction_router_is_stable_across_processes_and_keeps_shares():
    keys = [f"shard-{i // 100:03d}/{i:06d}" for i in range(20000)]
    r = R.FractionRouter([6, 9, 12], [0.2, 0.3, 0.5])
    depth = r.route(None, keys)
    shares = [(depth == e).mean() for e in (6, 9, 12)]
    assert shares == pytest.approx([0.2, 0.3, 0.5], abs=0.015)
    # A fresh interpreter with a different hash seed routes the same keys the same way (Python's hash() would not).
    code = ("import json,sys; from pipeline.model.router import FractionRouter; "
            "print(json.dumps(FractionRouter([6,9,12],[0.2,0.3,0.5]).route(None, json.loads(sys.stdin.read())).tolist()))")
    out = subprocess.run([sys.executable, "-c", code], input=json.dumps(keys[:300]), capture_output=True, text=True,
                         check=True, env={"PYTHONHASHSEED": "12345", "PATH": ""})
    assert json.loads(out.stdout) == depth[:300].tolist()
    # Pinned: the hash is part of the contract (a changed hash would re-route a resumed run differently).
    assert R.FractionRouter([6, 12], [0.5, 0.5]).route(None, list("abcdefgh")).tolist() == [6, 12, 6, 12, 6, 6, 6, 6]


@pytest.mark.parametrize("router", [
    R.FixedRouter(12),
    R.FractionRouter([6, 12], [0.25, 0.75], salt="x"),
    R.ThresholdRouter([6, 9, 12], [float("-inf"), 0.42], scorer_identity={"kind": "heuristic"},
                      calibration={"mode": "gflops_budget", "target": 0.7}),
])
def test_json_round_trip(tmp_path, router):
    path = str(tmp_path / "sub" / "router.json")
    R.save_router(router, path)
    text = open(path).read()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    back = R.load_router(path)
    assert back.to_dict() == router.to_dict()
    scores = np.linspace(0, 1, 50)
    keys = [str(i) for i in range(50)]
    assert back.route(scores, keys).tolist() == router.route(scores, keys).tolist()


def test_router_on_s3(s3_bucket):
    router = R.ThresholdRouter([6, 12], [0.5])
    url = f"s3://{s3_bucket}/routers/r.json"
    R.save_router(router, url)
    assert R.load_router(url).to_dict() == router.to_dict()


def test_load_router_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="icar calibrate"):
        R.load_router(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text('{"kind": "magic"}')
    with pytest.raises(ValueError, match="unknown router kind"):
        R.load_router(str(tmp_path / "bad.json"))


def test_exit_fractions_family_is_continuous_and_monotone():
    for n in (2, 3, 4):
        grid = np.linspace(0, n - 1, 301)
        fr = np.array([R.exit_fractions(n, a) for a in grid])
        assert np.allclose(fr.sum(1), 1.0)
        assert np.abs(np.diff(fr, axis=0)).max() < 0.05  # no jumps at stage boundaries
        exits = [8, 16, 24, 20][:n]
        exits = sorted(exits)
        cost = fr @ np.array([GFLOPS.get(e, e) for e in exits])
        assert (np.diff(cost) <= 1e-9).all()
        assert fr[0].tolist() == [0.0] * (n - 1) + [1.0] and fr[-1].tolist() == [1.0] + [0.0] * (n - 1)
    assert R.exit_fractions(3, 1.0).tolist() == pytest.approx([0.5, 0.5, 0.0])
    assert R.exit_fractions(3, 1.0, shares=[3, 1]).tolist() == pytest.approx([0.75, 0.25, 0.0])


@pytest.mark.parametrize("exits", [[12, 24], [12, 18, 24], [8, 12, 16, 24]])
@pytest.mark.parametrize("budget", [0.6, 0.75, 0.9])
def test_budget_is_met_on_a_held_out_sample(exits, budget):
    rng = np.random.default_rng(7)
    scores = rng.beta(2, 3, size=8000)
    calib, held_out = scores[:4000], scores[4000:]
    router = R.calibrate_budget(calib, exits, GFLOPS, SCORER, budget)
    on_sample = R.realised_mix(router, calib, GFLOPS, SCORER)["cost_fraction"]
    assert on_sample <= budget + 1e-9
    assert on_sample == pytest.approx(budget, abs=0.002)  # not needlessly aggressive
    assert R.realised_mix(router, held_out, GFLOPS, SCORER)["cost_fraction"] == pytest.approx(budget, abs=0.01)
    c = router.calibration
    assert c["mode"] == "gflops_budget" and c["target"] == budget and c["sample_size"] == 4000
    assert c["achieved_cost_fraction"] == pytest.approx(on_sample)
    # Complex images never go shallower than simpler ones.
    order = np.argsort(held_out)
    assert (np.diff(router.route(held_out[order], None).astype(int)) >= 0).all()


def test_budget_monotone_and_edge_cases():
    scores = np.random.default_rng(3).random(3000)
    exits = [12, 18, 24]
    costs, thresholds = [], []
    for budget in (0.55, 0.65, 0.75, 0.85, 0.95):
        r = R.calibrate_budget(scores, exits, GFLOPS, SCORER, budget)
        costs.append(r.calibration["achieved_cost_fraction"])
        thresholds.append(r.thresholds)
    assert costs == sorted(costs)
    assert all(np.all(np.array(a) >= np.array(b)) for a, b in zip(thresholds, thresholds[1:]))
    # A budget above full depth + scorer: everything at full depth.
    r = R.calibrate_budget(scores, exits, GFLOPS, SCORER, 1.5)
    assert (r.route(scores, None) == 24).all()
    # Below the scorer + shallowest exit: a clear refusal.
    floor = (SCORER + GFLOPS[12]) / GFLOPS[24]
    with pytest.raises(ValueError, match="unreachable"):
        R.calibrate_budget(scores, exits, GFLOPS, SCORER, floor - 0.01)
    r = R.calibrate_budget(scores, exits, GFLOPS, SCORER, floor)
    assert (r.route(scores, None) == 12).all()
    with pytest.raises(ValueError, match="NaN"):
        R.calibrate_budget(np.array([0.1, np.nan]), exits, GFLOPS, SCORER, 0.8)
    with pytest.raises(ValueError, match="no cost for exits"):
        R.calibrate_budget(scores, [12, 30], GFLOPS, SCORER, 0.8)


@pytest.mark.parametrize("exits", [[12, 24], [12, 18, 24]])
def test_budget_confidence_keeps_new_samples_within_the_budget(exits):
    """Fitted exactly on its sample, a budget is overspent on the images that follow about half the time; with
    budget_confidence 0.95 the population cost stays within it in about 95 % of calibrations, at a margin of
    z · std(cost per image) / sqrt(n). Uniform scores: the population share under a threshold is the threshold."""
    budget, n = 0.8, 1000
    table = R._gflops_table(exits, GFLOPS)

    def population_cost(router) -> float:
        edges = np.concatenate([[0.0], np.clip(router.thresholds, 0.0, 1.0), [1.0]])
        return (SCORER + float(np.diff(edges) @ np.array([table[e] for e in exits]))) / table[exits[-1]]

    within = {0.5: [], 0.95: []}
    for seed in range(200):
        sample = np.random.default_rng(seed).random(n)
        for conf in within:
            r = R.calibrate_budget(sample, exits, GFLOPS, SCORER, budget, budget_confidence=conf)
            within[conf].append(population_cost(r) <= budget)
            c = r.calibration
            assert c["budget_confidence"] == conf and c["achieved_cost_fraction"] <= budget + 1e-9
            if conf == 0.5:
                assert c["margin_cost_fraction"] == 0.0
            else:  # the margin is the stated bound, the fit is under budget by it (one quantile step at most)
                row = R.row_costs(r.route(sample, None), table)
                assert c["margin_cost_fraction"] == pytest.approx(
                    1.6449 * row.std(ddof=1) / np.sqrt(n) / table[exits[-1]], rel=0.05)
                assert c["achieved_cost_fraction"] <= budget - c["margin_cost_fraction"] + 1e-9
                assert c["achieved_cost_fraction"] > budget - c["margin_cost_fraction"] - 0.003
    assert 0.3 < np.mean(within[0.5]) < 0.7
    assert np.mean(within[0.95]) >= 0.9


def test_budget_confidence_edge_cases():
    scores = np.random.default_rng(0).random(500)
    exits = [12, 18, 24]
    for bad in (0.4, 1.0, 1.5):
        with pytest.raises(ValueError, match="--budget-confidence is a probability in"):
            R.calibrate_budget(scores, exits, GFLOPS, SCORER, 0.8, budget_confidence=bad)
    # every image at one exit costs the same for every image: nothing to guard against, no margin
    floor = (SCORER + GFLOPS[12]) / GFLOPS[24]
    r = R.calibrate_budget(scores, exits, GFLOPS, SCORER, floor, budget_confidence=0.99)
    assert r.calibration["margin_cost_fraction"] == 0.0 and (r.route(scores, None) == 12).all()
    r = R.calibrate_budget(scores, exits, GFLOPS, SCORER, 1.5, budget_confidence=0.99)
    assert r.calibration["margin_cost_fraction"] == 0.0 and (r.route(scores, None) == 24).all()
    # just above the floor the margin may not push the fit under the floor
    r = R.calibrate_budget(scores, exits, GFLOPS, SCORER, floor + 0.001, budget_confidence=0.99)
    assert r.calibration["achieved_cost_fraction"] >= floor - 1e-9


def test_budget_with_tied_scores_never_overspends():
    scores = np.concatenate([np.zeros(600), np.full(300, 0.5), np.random.default_rng(0).random(100)])
    for budget in (0.6, 0.7, 0.8, 0.95):
        r = R.calibrate_budget(scores, [12, 24], GFLOPS, SCORER, budget)
        assert r.calibration["achieved_cost_fraction"] <= budget + 1e-9


def _recall_fixture(n=300, dim=32, seed=0):
    """Images whose early-exit embeddings degrade with complexity: routing by score should matter."""
    rng = np.random.default_rng(seed)
    full = rng.normal(size=(n, dim))
    full /= np.linalg.norm(full, axis=1, keepdims=True)
    complexity = rng.random(n)
    text = full + 0.6 * rng.normal(size=(n, dim)) / np.sqrt(dim)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    exits = {}
    for e, strength in ((12, 4.0), (18, 2.0), (24, 0.0)):
        noisy = full + strength * complexity[:, None] * rng.normal(size=(n, dim)) / np.sqrt(dim)
        exits[e] = noisy / np.linalg.norm(noisy, axis=1, keepdims=True)
    return complexity, exits, text, np.arange(n)


def test_recall_calibration_meets_floor_and_is_monotone():
    from pipeline.metrics import recall_at_k

    scores, exit_emb, text, t2i = _recall_fixture()
    full = recall_at_k(text @ exit_emb[24].T, t2i, (10,))[10]
    costs = []
    for floor in (0.9, 0.97, 1.0):
        r = R.calibrate_recall(scores, exit_emb, text, t2i, floor, GFLOPS, SCORER, steps=20)
        depth = r.route(scores, None)
        routed = R.routed_embeddings(depth, exit_emb)
        recall = recall_at_k(text @ routed.T, t2i, (10,))[10]
        assert recall >= floor * full - 1e-12
        assert r.calibration["achieved_recall"] == pytest.approx(recall)
        costs.append(r.calibration["achieved_cost_fraction"])
    assert costs[0] < 0.9  # the loose floor really saves compute
    assert costs == sorted(costs)
    # The recall the floor is checked on is the index's: each exit's rows scaled by the heads' exit_scales.
    scales = {12: 1.3, 18: 1.1}
    r = R.calibrate_recall(scores, exit_emb, text, t2i, 0.9, GFLOPS, SCORER, steps=20, exit_scales=scales)
    depth = r.route(scores, None)
    gallery = R.routed_embeddings(depth, exit_emb) * np.array([scales.get(int(d), 1.0) for d in depth])[:, None]
    assert r.calibration["achieved_recall"] == pytest.approx(recall_at_k(text @ gallery.T, t2i, (10,))[10])
    # ... and shifted by their exit_offsets (`icar index`'s extra dimension): an exit row scores scale x cos + offset
    offsets = {12: 0.2, 18: -0.05}
    r = R.calibrate_recall(scores, exit_emb, text, t2i, 0.9, GFLOPS, SCORER, steps=20, exit_scales=scales,
                           exit_offsets=offsets)
    depth = r.route(scores, None)
    gallery = R.routed_embeddings(depth, exit_emb) * np.array([scales.get(int(d), 1.0) for d in depth])[:, None]
    shift = np.array([offsets.get(int(d), 0.0) for d in depth])
    assert set(depth) & {12, 18}  # the offsets touch routed rows
    assert r.calibration["achieved_recall"] == pytest.approx(
        recall_at_k(text @ gallery.T + shift[None, :], t2i, (10,))[10])
    # Scores that carry no information about the damage cannot save as much as the true ones.
    shuffled = np.random.default_rng(1).permutation(scores)
    blind = R.calibrate_recall(shuffled, exit_emb, text, t2i, 0.9, GFLOPS, SCORER, steps=20)
    assert blind.calibration["achieved_cost_fraction"] >= costs[0]


def test_recall_confidence_holds_the_floor_for_new_images_more_often():
    """Fitted on the sample's own ratio (0.5) the floor is missed on fresh images about half the time; with
    recall_confidence 0.95 the thresholds are chosen on a bootstrap lower bound and hold far more often, at a
    cost never below the exact fit's. Fresh images: other draws of the same fixture (the same gallery size)."""
    from pipeline.metrics import recall_at_k

    floor, held = 0.9, {0.5: [], 0.95: []}
    for seed in range(30):
        scores, exit_emb, text, t2i = _recall_fixture(n=200, seed=seed)
        f_scores, f_emb, f_text, f_t2i = _recall_fixture(n=2000, seed=1000 + seed)
        full = recall_at_k(f_text @ f_emb[24].T, f_t2i, (10,))[10]
        cost = {}
        for p in held:
            r = R.calibrate_recall(scores, exit_emb, text, t2i, floor, GFLOPS, SCORER, steps=20, recall_confidence=p)
            c = r.calibration
            assert c["recall_confidence"] == p and c["recall_ratio_bound"] >= floor - 1e-12
            assert c["recall_ratio_bound"] <= c["achieved_recall_ratio"] + 1e-12
            routed = R.routed_embeddings(r.route(f_scores, None), f_emb)
            # the fresh gallery is 10x the sample's: compare recall@100 there with recall@10 here (same share)
            held[p].append(recall_at_k(f_text @ routed.T, f_t2i, (100,))[100]
                           >= floor * recall_at_k(f_text @ f_emb[24].T, f_t2i, (100,))[100])
            cost[p] = c["achieved_cost_fraction"]
        assert cost[0.95] >= cost[0.5] - 1e-12 and full > 0
    assert np.mean(held[0.95]) >= 0.8
    assert np.mean(held[0.95]) > np.mean(held[0.5]) + 0.2


def test_recall_floor_passes_full_depth_even_where_it_rarely_hits():
    """Resamples in which full depth finds nothing must not fail full depth's own floor (recall@1 of a weak model)."""
    full = np.zeros(30)
    full[3] = 1.0
    floor = R.RecallFloor(full, 0.99, 0.95)
    assert floor.holds(full) == (True, 1.0)
    assert floor.holds(np.zeros(30))[0] is False
    assert R.RecallFloor(full, 0.99, 0.5).holds(full) == (True, 1.0)


def test_sample_recall_reports_the_mix_beside_every_fixed_exit():
    from pipeline.metrics import recall_at_k
    from pipeline.training.calibrate import sample_recall

    scores, exit_emb, text, t2i = _recall_fixture()
    tower = {12: 12.0, 18: 18.0, 24: 24.0}
    for e in (12, 18, 24):  # every image at one exit: the routed figure is that exit's
        r = sample_recall(np.full(len(scores), e), exit_emb, text, t2i, tower)
        want = recall_at_k(text @ exit_emb[e].T, t2i, (1, 10))
        assert r["routed"] == {"t2i@1": want[1], "t2i@10": want[10]}
        if e < 24:
            assert r["fixed_exits"][str(e)] == {"cost_fraction": e / 24, "t2i@1": want[1], "t2i@10": want[10]}
    assert set(r["fixed_exits"]) == {"12", "18"} and r["routed_ratio"]["t2i@1"] == 1.0 and r["captions"] == 300
    depth = np.where(scores < 0.5, 12, 24)  # simple images early: between exit 12 and full depth
    mixed = sample_recall(depth, exit_emb, text, t2i, tower)["routed"]["t2i@1"]
    assert r["fixed_exits"]["12"]["t2i@1"] < mixed <= r["full"]["t2i@1"]
    # the per-exit scales `icar index` applies move the routed figure; a scale of 1 changes nothing
    up = sample_recall(depth, exit_emb, text, t2i, tower, {12: 1.5})["routed"]["t2i@1"]
    assert up != mixed and sample_recall(depth, exit_emb, text, t2i, tower, {12: 1.0})["routed"]["t2i@1"] == mixed
    # and so do the offsets, as the index's extra dimension adds them: exit-12 rows score 1.5 x cos + 0.1
    shifted = sample_recall(depth, exit_emb, text, t2i, tower, {12: 1.5}, {12: 0.1, 24: 0.0})
    gallery = R.routed_embeddings(depth, exit_emb) * np.where(depth == 12, 1.5, 1.0)[:, None]
    want = recall_at_k(text @ gallery.T + np.where(depth == 12, 0.1, 0.0)[None, :], t2i, (1, 10))
    assert shifted["routed"] == {"t2i@1": want[1], "t2i@10": want[10]} and shifted["routed"]["t2i@1"] != up
    assert shifted["fixed_exits"] == r["fixed_exits"] and shifted["full"] == r["full"]  # one depth: no rank moves
    assert sample_recall(depth, exit_emb, text, t2i, tower, {12: 1.5}, {12: 0.0})["routed"]["t2i@1"] == up


def test_by_gallery_size_searches_each_caption_within_its_part_and_shows_the_share_falling(caplog):
    from pipeline.metrics import recall_at_k
    from pipeline.training.calibrate import by_gallery_size, sample_recall

    scores, exit_emb, text, t2i = _recall_fixture(n=800, seed=3)
    text, t2i = text[::2], t2i[::2]  # half the images captioned: the others still compete in the galleries
    sizes = by_gallery_size({"full": exit_emb[24], "exit 12": exit_emb[12]}, text, t2i, min_images=100)
    assert [g["images"] for g in sizes] == [100, 200, 400, 800]
    assert all(g["captions"] == 400 for g in sizes)  # every caption searched once per size, within its image's part
    whole = sizes[-1]["t2i@1"]
    assert whole == {"full": recall_at_k(text @ exit_emb[24].T, t2i, (1,))[1],
                     "exit 12": recall_at_k(text @ exit_emb[12].T, t2i, (1,))[1]}
    for small, large in zip(sizes, sizes[1:]):  # fewer competitors: a caption's rank can only improve
        assert small["t2i@1"]["full"] >= large["t2i@1"]["full"]
        assert small["t2i@1"]["exit 12"] >= large["t2i@1"]["exit 12"]
    share = [g["t2i@1"]["exit 12"] / g["t2i@1"]["full"] for g in sizes]
    assert share[0] > share[-1] + 0.05  # the degraded exit keeps less of full depth as the gallery grows

    tower = {12: 12.0, 18: 18.0, 24: 24.0}
    with caplog.at_level("WARNING", logger="icar.calibrate"):
        r = sample_recall(np.full(800, 12), exit_emb, text, t2i, tower)
    assert r["gallery_images"] == 800 and [g["images"] for g in r["by_gallery"]] == [100, 200, 400, 800]
    assert r["by_gallery"][-1]["routed_ratio"] == pytest.approx(r["routed_ratio"]["t2i@1"])
    assert r["by_gallery"][0]["routed_ratio"] == pytest.approx(share[0])
    assert "share falls as the gallery grows" in caplog.text
    slope = np.polyfit(np.log2([100, 200, 400, 800]), [g["routed_ratio"] for g in r["by_gallery"]], 1)[0]
    assert r["routed_ratio_per_doubling"] == pytest.approx(slope) and slope < 0
    caplog.clear()
    with caplog.at_level("WARNING", logger="icar.calibrate"):  # full depth keeps all of itself at every size
        r = sample_recall(np.full(800, 24), exit_emb, text, t2i, tower)
    assert all(g["routed_ratio"] == 1.0 for g in r["by_gallery"]) and "gallery grows" not in caplog.text
    assert r["routed_ratio_per_doubling"] == pytest.approx(0.0, abs=1e-12)
    assert sample_recall(np.full(60, 12), {e: v[:60] for e, v in exit_emb.items()}, text[:30], t2i[:30],
                         tower)["by_gallery"] == []  # a sample under MIN_GALLERY images: no sub-galleries to compare


# ------------------------------------------------------------------------------------- icar calibrate


def _write_run(run, scores):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (run / "shards").mkdir(parents=True)
    half = len(scores) // 2
    for part, chunk in enumerate((scores[:half], scores[half:])):
        complexity = pa.array([None if i == 0 else float(s) for i, s in enumerate(chunk)], pa.float32())
        pq.write_table(pa.table({"key": [f"{part}-{i}" for i in range(len(chunk))], "complexity": complexity}),
                       run / "shards" / f"part-{part:05d}.parquet")
    run_json = {"model": {"name": "ViT-L-14", "weights_sha256": "abc"}, "exits": [12, 18, 24],
                "gflops_per_exit": {str(k): GFLOPS[k] for k in (12, 18, 24)}, "scorer_gflops": SCORER,
                "scorer": {"kind": "convnext", "sha256": "def"}, "heads": None}
    (run / "run.json").write_text(json.dumps(run_json))


def test_calibrate_job_from_a_run(tmp_path, capsys):
    from jobs import calibrate

    _write_run(tmp_path / "run", np.random.default_rng(0).random(3000))
    out = tmp_path / "router.json"
    assert calibrate.main(["--scores-from", str(tmp_path / "run"), "--gflops-budget", "0.7", "--sample", "2000",
                           "--output", str(out)]) == 0
    router = R.load_router(str(out))
    c = router.calibration
    assert router.exits == [12, 18, 24] and router.scorer_identity == {"kind": "convnext", "sha256": "def"}
    assert c["mode"] == "gflops_budget" and c["target"] == 0.7 and c["sample_size"] == 2000
    assert c["achieved_cost_fraction"] <= 0.7 and c["model"]["name"] == "ViT-L-14" and c["exits"] == [12, 18, 24]
    assert json.loads(capsys.readouterr().out)["output"] == str(out)
    assert calibrate.main(["--scores-from", str(tmp_path / "run"), "--min-recall", "0.9",
                           "--output", str(out)]) == 2
    assert "captioned input shards" in capsys.readouterr().err
    assert calibrate.main(["--scores-from", str(tmp_path / "run"), "--gflops-budget", "0.2",
                           "--output", str(out)]) == 2
    assert "unreachable" in capsys.readouterr().err
    # the budget is a ceiling by default (0.95); --budget-confidence 0.5 fits the sample exactly; both recorded
    assert c["budget_confidence"] == 0.95 and c["margin_cost_fraction"] > 0
    assert c["achieved_cost_fraction"] <= 0.7 - c["margin_cost_fraction"] + 1e-9
    exact = tmp_path / "exact.json"
    assert calibrate.main(["--scores-from", str(tmp_path / "run"), "--gflops-budget", "0.7", "--sample", "2000",
                           "--budget-confidence", "0.5", "--output", str(exact)]) == 0
    e = R.load_router(str(exact)).calibration
    assert e["budget_confidence"] == 0.5 and e["margin_cost_fraction"] == 0.0
    assert c["achieved_cost_fraction"] < e["achieved_cost_fraction"] <= 0.7
    assert json.loads(capsys.readouterr().out)["margin_cost_fraction"] == 0.0
    for bad, says in ((["--gflops-budget", "0.7", "--budget-confidence", "1"], "a probability in [0.5, 1), got 1.0"),
                      (["--min-recall", "0.9", "--budget-confidence", "0.9"],
                       "with --min-recall use --recall-confidence"),
                      (["--gflops-budget", "0.7", "--recall-confidence", "0.9"], "use --budget-confidence"),
                      (["--min-recall", "0.9", "--recall-confidence", "0.3"], "--recall-confidence is a probability")):
        assert calibrate.main(["--scores-from", str(tmp_path / "run"), *bad, "--output", str(tmp_path / "b.json")]) == 2
        assert says in capsys.readouterr().err
    assert not (tmp_path / "b.json").exists()


TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 4, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def test_calibrate_job_from_captioned_inputs(tmp_path, monkeypatch):
    from PIL import Image, ImageDraw
    from safetensors.torch import save_file

    from jobs import calibrate
    from pipeline.model import models

    monkeypatch.setenv("ICAR_CACHE_DIR", str(tmp_path / "cache"))
    model_dir = tmp_path / "tiny-clip"
    model_dir.mkdir()
    (model_dir / "clip_config.json").write_text(json.dumps({"model_name": "tiny", "model_cfg": TINY_CLIP}))
    model = models.create_from_config(TINY_CLIP, seed=3)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(model_dir / "clip.safetensors"))
    images = tmp_path / "shard"
    images.mkdir()
    rng = np.random.default_rng(0)
    colours = ["red", "green", "blue", "yellow", "purple", "orange"]
    for i in range(30):
        img = Image.new("RGB", (48, 48), colours[i % 6])
        draw = ImageDraw.Draw(img)
        for _ in range(i):
            x, y = rng.integers(0, 40, 2)
            draw.rectangle([int(x), int(y), int(x) + 6, int(y) + 6], fill=colours[(i + 1) % 6])
        img.save(images / f"{i:03d}.png")
        (images / f"{i:03d}.txt").write_text(f"a {colours[i % 6]} square with {i} small boxes")
    common = [str(images), "--model", str(model_dir), "--exits", "2,4", "--scorer", "heuristic",
              "--sample", "30", "--device", "cpu"]
    out = tmp_path / "budget.json"
    assert calibrate.main(common + ["--gflops-budget", "0.8", "--output", str(out)]) == 0
    router = R.load_router(str(out))
    c = router.calibration
    assert router.exits == [2, 4] and c["sample_size"] == 30 and c["achieved_cost_fraction"] <= 0.8
    assert "tiny" in (c["model"]["name"], c["model"].get("config_name")) and c["model"]["weights_sha256"]
    assert router.scorer_identity["kind"] == "heuristic"
    # captioned sample: the mix's recall beside each fixed exit, in both modes (the recall mode's is the fit's own)
    assert set(c["sample_recall"]["fixed_exits"]) == {"2"} and c["sample_recall"]["captions"] == 30
    assert c["sample_recall"]["fixed_exits"]["2"]["cost_fraction"] == pytest.approx(0.5, abs=0.1)
    out = tmp_path / "recall.json"
    assert calibrate.main(common + ["--min-recall", "0.9", "--output", str(out)]) == 0
    c = R.load_router(str(out)).calibration
    assert c["mode"] == "min_recall" and c["achieved_recall_ratio"] >= 0.9 and c["captions"] == 30
    assert c["achieved_recall"] >= 0.9 * c["full_depth_recall"] > 0
    assert c["sample_recall"]["routed"]["t2i@10"] == pytest.approx(c["achieved_recall"])
    # --recall-at 1: the floor on recall@1 (what a small sample can still tell apart), the report alongside
    assert calibrate.main(common + ["--min-recall", "0.9", "--recall-at", "1", "--output", str(out)]) == 0
    c = R.load_router(str(out)).calibration
    assert c["metric"] == "text->image recall@1" and c["achieved_recall_ratio"] >= 0.9
    assert c["sample_recall"]["routed"]["t2i@1"] == pytest.approx(c["achieved_recall"])
    assert calibrate.main(common + ["--min-recall", "0.9", "--recall-at", "0", "--output", str(out)]) == 2
    # without captions a budget needs no embeddings, and reports none
    for f in images.glob("*.txt"):
        f.unlink()
    assert calibrate.main(common + ["--gflops-budget", "0.8", "--output", str(tmp_path / "bare.json")]) == 0
    assert "sample_recall" not in R.load_router(str(tmp_path / "bare.json")).calibration


# ------------------------------------------------------------------------ the router's scorer is the worker's


def _demo_worker(tmp_path, monkeypatch, **spec):
    from pipeline.model.spec import ModelSpec
    from pipeline.model.worker import ModelWorker

    monkeypatch.setenv("ICAR_CACHE_DIR", str(tmp_path / "cache"))
    return ModelWorker(ModelSpec(model="demo", device="cpu", torch_threads=1, **spec))


def test_worker_refuses_a_router_calibrated_for_another_scorer(tmp_path, monkeypatch):
    # The demo's shipped router was calibrated for the demo's own scorer, which --scorer default runs.
    w = _demo_worker(tmp_path, monkeypatch)
    shipped = w.router.scorer_identity
    assert shipped["kind"] == "heuristic" and shipped["input_size"] == 64
    assert scorer_identity.scorer_differences(shipped, w.scorer.identity) == []
    # The generic heuristic analyses at 128 px: same kind, other scores, so the shipped router is refused.
    with pytest.raises(ValueError) as e:
        _demo_worker(tmp_path, monkeypatch, scorer="heuristic")
    msg = str(e.value)
    assert "pipeline/assets/demo/router.json" in msg and "differ in input_size" in msg
    assert "64 px" in msg and "128 px" in msg and "icar calibrate" in msg and "--scorer default" in msg

    def router_for(identity):
        path = tmp_path / f"router-{len(list(tmp_path.glob('router-*')))}.json"
        R.save_router(R.ThresholdRouter([4, 6, 8], [0.1, 0.3], scorer_identity=identity), str(path))
        return str(path)

    trained = {"kind": "convnext", "name": "complexity-net:x", "backbone": "x", "sha256": "ab" * 32, "bins": 10,
               "input_size": 64, "checkpoint": "/elsewhere/x.safetensors"}
    with pytest.raises(ValueError, match=r"calibrated for scorer convnext .*sha256 abababababab.*scores with "
                                         r"heuristic .*--scorer convnext --checkpoint FILE with sha256 abab"):
        _demo_worker(tmp_path, monkeypatch, router=router_for(trained))
    # What does not define the scores (a label, where a file lies) does not matter; nor does a router that
    # records no scorer, or one that routes without scores.
    assert _demo_worker(tmp_path, monkeypatch, router=router_for({**shipped, "name": "renamed",
                                                                  "checkpoint": "/some/path"}))
    assert _demo_worker(tmp_path, monkeypatch, scorer="heuristic", router=router_for(None))
    fraction = tmp_path / "fractions.json"
    R.save_router(R.FractionRouter([4, 6, 8], [0.3, 0.3, 0.4]), str(fraction))
    assert _demo_worker(tmp_path, monkeypatch, scorer="heuristic", router=str(fraction))


def test_calibrate_default_scorer_is_the_one_embed_runs(tmp_path, monkeypatch, capsys):
    import os

    from jobs import calibrate

    shard = "/work/demo-corpus/val/00020.tar"
    if not os.path.exists(shard):
        pytest.skip("the demo corpus is not on this machine (make demo-corpus)")
    monkeypatch.setenv("ICAR_CACHE_DIR", str(tmp_path / "cache"))
    out = str(tmp_path / "router.json")
    assert calibrate.main([shard, "--model", "demo", "--scorer", "default", "--sample", "64", "--gflops-budget",
                           "0.75", "--device", "cpu", "--output", out]) == 0
    router = R.load_router(out)
    w = _demo_worker(tmp_path, monkeypatch, router=out)  # accepted: the same scorer
    assert router.scorer_identity == w.scorer.identity and router.scorer_identity["input_size"] == 64
    assert router.calibration["scorer_gflops"] == pytest.approx(w.scorer_gflops)
    with pytest.raises(ValueError, match="differ in input_size"):
        _demo_worker(tmp_path, monkeypatch, router=out, scorer="heuristic")
