"""pipeline.model.merging: off = the tower bit for bit; token counts and counted GFLOPs follow the schedule; class token kept."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.model import flops, merging, models
from pipeline.model.spec import MergeSchedule, merge_spec, parse_merge, parse_profile, parse_profiles
from tinyclip import tiny


def _images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_spec_round_trip_and_errors():
    for spec in ["r4", "keep0.8", "r2:noprop", "keep1"]:
        assert parse_merge(spec).spec == spec
    assert parse_merge("none") is None and parse_merge(None) is None
    assert parse_merge("keep0.75") == MergeSchedule(keep=0.75)
    for bad in ["r-1", "keep0", "keep1.5", "x4", "r4:prop"]:
        with pytest.raises(ValueError):
            parse_merge(bad)
    with pytest.raises(ValueError, match="exactly one"):
        MergeSchedule(r=2, keep=0.5)


def test_schedule_token_counts_clamp_and_keep_ratio():
    assert MergeSchedule(r=2).token_counts(17, 4) == [17, 15, 13, 11, 9]
    # bipartite matching can at most halve the 16 mergeable tokens: r=8 then 4, 2, 1, 0
    assert MergeSchedule(r=8).token_counts(17, 6) == [17, 9, 5, 3, 2, 2, 2]
    # keep 0.75 of the mergeable tokens per block: merge round(0.25 * 16) = 4, then round(0.25 * 12) = 3, ...
    assert MergeSchedule(keep=0.75).token_counts(17, 3) == [17, 13, 10, 8]
    assert MergeSchedule(keep=1.0).merges(197, 12) == [0] * 12


@pytest.mark.parametrize("vision", [{}, {"pool_type": "avg"}, {"pool_type": "avg", "final_ln_after_pool": True},
                                    {"ls_init_value": 0.1}])
def test_merging_off_is_bit_identical(vision):
    b = tiny(**vision)
    visual = b.model.visual.eval()
    x = _images(3)
    with torch.no_grad():
        ref = visual(x)
        assert torch.equal(merging.encode_image(visual, x, None), ref)
        # a schedule that merges nothing never leaves the block's own forward
        assert torch.equal(merging.encode_image(visual, x, MergeSchedule(r=0)), ref)
        merged = merging.encode_image(visual, x, MergeSchedule(r=2))
    assert merged.shape == ref.shape and not torch.equal(merged, ref)


@pytest.mark.parametrize("spec", ["r3", "keep0.7", "r8:noprop"])
def test_token_count_per_block_follows_the_schedule(spec):
    b = tiny(seed=1)
    visual = b.model.visual.eval()
    schedule = parse_merge(spec)
    seen = []
    with torch.no_grad():
        x = visual._embeds(_images(2, seed=1))
        size = None
        for blk, r in zip(visual.transformer.resblocks, schedule.merges(x.shape[1], 4)):
            seen.append(x.shape[1])
            x, size = merging.run_block(blk, x, size, r, schedule.prop_attn)
        seen.append(x.shape[1])
    assert seen == schedule.token_counts(17, 4)
    assert size.shape == (2, seen[-1], 1)
    assert torch.equal(size.sum(dim=1), torch.full((2, 1), 17.0))  # every patch is accounted for exactly once


def test_class_token_is_never_merged_and_stays_first():
    torch.manual_seed(0)
    n, c = 9, 8
    x = torch.randn(2, n, c)
    metric = x.clone()
    metric[:, 0] = metric[:, 1]  # the class token looks exactly like a patch token: the best match of all
    merge = merging.bipartite_soft_matching(metric, r=4)
    out, size = merging.merge_wavg(merge, x, None)
    assert out.shape == (2, n - 4, c)
    assert torch.equal(out[:, 0], x[:, 0]) and torch.equal(size[:, 0], torch.ones(2, 1))
    # with a real tower: the class token stays at position 0 under the most aggressive schedule
    b = tiny(seed=2)
    visual = b.model.visual.eval()
    with torch.no_grad():
        tokens = visual._embeds(_images(2, seed=2))
        _, size = merging.run_blocks(visual.transformer.resblocks, tokens, None, MergeSchedule(r=8), 0, 4, 17)
    assert torch.equal(size[:, 0], torch.ones(2, 1)) and size.shape[1] == 2


def test_proportional_attention_equals_attention_over_duplicated_tokens():
    # a token of size 2 is attended to as much as two identical tokens of size 1 (why ToMe adds log(size))
    b = tiny(seed=3)
    attn = b.model.visual.transformer.resblocks[0].attn.eval()
    x = torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(3))
    dup = torch.cat([x, x[:, 4:5]], dim=1)
    with torch.no_grad():
        want, _ = merging._attention(attn, dup, None)
        got, _ = merging._attention(attn, x, torch.tensor([[1.0], [1.0], [1.0], [1.0], [2.0]])[None])
    torch.testing.assert_close(got, want[:, :5], atol=1e-5, rtol=1e-5)


def test_avg_pooling_weighs_merged_tokens_by_size():
    b = tiny(seed=4, pool_type="avg")
    visual = b.model.visual.eval()
    tokens = torch.randn(1, 4, 64, generator=torch.Generator().manual_seed(4))
    expanded = torch.cat([tokens, tokens[:, 3:4]], dim=1)  # token 3 stands for two patches
    size = torch.tensor([[1.0], [1.0], [1.0], [2.0]])[None]
    with torch.no_grad():
        torch.testing.assert_close(merging.pool_tower(visual, tokens, size), merging.pool_tower(visual, expanded, None))


def _block_gflops(n_in: int, n_out: int, width: int, heads: int, mlp_ratio: float = 4.0) -> float:
    """Return one block's GFLOPs by formula: attention at n_in tokens, matching if merging, MLP at n_out."""
    attn = 2 * n_in * width * 3 * width + 2 * 2 * n_in * n_in * width + 2 * n_in * width * width
    match = 2 * math.ceil(n_in / 2) * (n_in // 2) * (width // heads) if n_out < n_in else 0
    mlp = 2 * 2 * n_out * width * int(width * mlp_ratio)
    return (attn + match + mlp) / 1e9


@pytest.mark.parametrize("spec", ["none", "r3", "keep0.6"])
def test_counted_gflops_per_block_follow_the_schedule(spec):
    b = tiny(seed=5)
    schedule = parse_merge(spec)
    profile = flops.count_tower_profile(b.model.visual, 32, schedule)
    counts = profile["tokens"]
    assert counts == (schedule.token_counts(17, 4) if schedule else [17] * 5)
    for i, g in enumerate(profile["blocks"]):
        assert g == pytest.approx(_block_gflops(counts[i], counts[i + 1], 64, 2), rel=1e-9), (spec, i)
    if schedule is not None:
        full = flops.count_tower_profile(b.model.visual, 32, None)
        assert sum(profile["blocks"]) < sum(full["blocks"])
        assert profile["stem"] == full["stem"]


def test_profile_gflops_are_cached_per_schedule(tmp_path, monkeypatch):
    monkeypatch.setenv("ICAR_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(flops, "_memory", {})
    b = tiny(seed=6)
    first = flops.tower_profile(b, MergeSchedule(r=2))
    flops._memory.clear()
    again = flops.tower_profile(b, MergeSchedule(r=2))
    assert again["blocks"] == first["blocks"] and again["merge"] == "r2"
    other = flops.tower_profile(b, MergeSchedule(keep=0.5))
    assert other["blocks"] != first["blocks"]
    none = flops.tower_profile(b, None)
    assert none["merge"] == "none" and none["blocks"] == flops.tower_profile(b)["blocks"]


def test_unsupported_blocks_are_refused():
    from open_clip.transformer import VisionTransformer

    visual = VisionTransformer(image_size=32, patch_size=8, width=64, layers=2, heads=2, mlp_ratio=4.0, output_dim=32)
    visual.transformer.resblocks[1].attn = torch.nn.Identity()
    with pytest.raises(NotImplementedError, match="block 1"):
        merging.encode_image(visual, _images(1), MergeSchedule(r=2))


# ------------------------------------------------------------------------------------------ AdaptiveEncoder

def test_encoder_groups_rows_by_schedule_and_exits_each_at_its_depth():
    from pipeline.model import encoder as enc

    b = tiny(seed=7)
    visual = b.model.visual.eval()
    encoder = enc.AdaptiveEncoder(visual, [1, 2, 4], schedules=["r3", "keep0.6"]).eval()
    assert [merge_spec(s) for s in encoder.schedules] == ["none", "r3", "keep0.6"]
    x = _images(9, seed=7)
    depths = torch.tensor([4, 1, 2, 4, 2, 1, 4, 4, 2])
    ids = torch.tensor([0, 1, 2, 1, 0, 2, 2, 1, 1])
    calls = []  # (rows, tokens) entering each block's first LayerNorm: merged and unmerged blocks both run ln_1
    hooks = [blk.ln_1.register_forward_hook(lambda m, i, o, k=k: calls.append((k, i[0].shape[0], i[0].shape[1])))
             for k, blk in enumerate(visual.transformer.resblocks)]
    try:
        with torch.no_grad():
            out = encoder(x, depths, ids)
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():
        for i in range(9):
            spec = encoder.schedules[int(ids[i])]
            want = encoder.forward_all_exits(x[i:i + 1], spec)[int(depths[i])]
            torch.testing.assert_close(out[i:i + 1], want, atol=1e-5, rtol=1e-5)
        # schedule 0 rows are exactly the encoder without merging
        plain = enc.AdaptiveEncoder(visual, [1, 2, 4]).eval()(x[ids == 0], depths[ids == 0])
    assert torch.equal(out[ids == 0], plain)
    # every block call holds one schedule's rows at that schedule's token count: groups never mix
    allowed = {s: (s.token_counts(17, 4) if s else [17] * 5) for s in encoder.schedules}
    per_group = {}
    for k, rows, tokens in calls:
        owners = [s for s, counts in allowed.items() if counts[k] == tokens]
        assert owners, (k, tokens)
        per_group.setdefault(k, []).append(rows)
    # block 1 runs all 9 rows, one call per schedule (2, 4 and 3 rows); block 3 only the 4 full-depth rows
    assert sorted(per_group[0]) == [2, 3, 4] and sorted(per_group[2]) == [1, 1, 2]


def test_encoder_without_merge_ids_is_unchanged_and_bad_ids_are_refused():
    from pipeline.model import encoder as enc

    b = tiny(seed=8)
    visual = b.model.visual.eval()
    x = _images(4, seed=8)
    d = torch.tensor([1, 4, 2, 4])
    with torch.no_grad():
        ref = enc.AdaptiveEncoder(visual, [1, 2, 4]).eval()(x, d)
        with_sched = enc.AdaptiveEncoder(visual, [1, 2, 4], schedules=["r2"]).eval()
        assert torch.equal(with_sched(x, d), ref)
        assert torch.equal(with_sched(x, d, torch.zeros(4, dtype=torch.long)), ref)
        with pytest.raises(ValueError, match="schedules 0..1"):
            with_sched(x, d, torch.tensor([0, 2, 0, 0]))
        with pytest.raises(ValueError, match="3 entries for a batch of 4"):
            with_sched(x, d, torch.tensor([0, 1, 0]))


def test_encoder_uses_heads_trained_for_the_schedule():
    from pipeline.model import encoder as enc

    b = tiny(seed=9)
    visual = b.model.visual.eval()
    plain_heads = enc.ExitHeads.for_bundle(b, [2, 4])
    merged_heads = enc.ExitHeads.for_bundle(b, [2, 4])
    with torch.no_grad():
        merged_heads.head(2).proj.add_(torch.randn_like(merged_heads.head(2).proj))
    encoder = enc.AdaptiveEncoder(visual, [2, 4], plain_heads, schedules=["keep0.5"],
                                  merge_heads={"keep0.5": merged_heads}).eval()
    x = _images(2, seed=9)
    with torch.no_grad():
        out = encoder(x, torch.tensor([2, 2]), torch.tensor([0, 1]))
        tokens, size = merging.run_blocks(visual.transformer.resblocks, visual._embeds(x[1:]), None,
                                          MergeSchedule(keep=0.5), 0, 2, 17)
        want = merged_heads.head(2).from_features(merging.pool_head(merged_heads.head(2), tokens, size))
        torch.testing.assert_close(out[1:], torch.nn.functional.normalize(want, dim=-1))
        torch.testing.assert_close(out[:1], enc.AdaptiveEncoder(visual, [2, 4], plain_heads).eval()(
            x[:1], torch.tensor([2])))


# ------------------------------------------------------------------------------------------ router, worker

def test_profiles_parse_and_router_round_trip(tmp_path):
    import numpy as np

    from pipeline.model import router as routers

    assert [p.spec for p in parse_profiles("4,6@r2,8@keep0.8:noprop,8")] == ["4", "6@r2", "8@keep0.8:noprop", "8"]
    for bad in ["x", "0@r2", "8@r2,8@r2", "8@fast"]:
        with pytest.raises(ValueError):
            parse_profiles(bad)
    scores = np.random.default_rng(0).random(400)
    costs = {"8": 1.0, "4": 0.5, "8@keep0.8": 0.7}
    r = routers.calibrate_profiles_budget(scores, list(costs), costs, 0.0, 0.75)
    assert r.profiles == ["4", "8@keep0.8", "8"]  # ordered by counted cost
    assert r.calibration["achieved_cost_fraction"] <= 0.75 + 1e-9
    assert r.calibration["full_profile"] == "8" and set(r.calibration["achieved_fractions"]) == set(r.profiles)
    idx = r.route_profiles(scores)
    assert np.array_equal(r.route(scores), np.asarray([4, 8, 8], np.int16)[idx])
    # the least complex images take the cheapest profile, NaN the dearest
    assert idx[np.argmin(scores)] == 0 and r.route_profiles(np.array([np.nan]))[0] == 2
    path = str(tmp_path / "router.json")
    routers.save_router(r, path)
    back = routers.load_router(path)
    assert back.profiles == r.profiles and back.thresholds == r.thresholds and back.calibration == r.calibration


def test_worker_routes_to_profiles_and_records_their_gflops(tmp_path, monkeypatch):
    import numpy as np

    from pipeline.model import router as routers
    from pipeline.model.spec import ModelSpec
    from pipeline.model.worker import ModelWorker

    monkeypatch.setenv("ICAR_CACHE_DIR", str(tmp_path / "cache"))
    r = routers.ProfileRouter(["4@keep0.8", "8@r2", "8"], [0.2, 0.4])
    routers.save_router(r, str(tmp_path / "router.json"))
    w = ModelWorker(ModelSpec(model="demo", router=str(tmp_path / "router.json"), scorer="heuristic", device="cpu"))
    desc = w.describe()
    assert [p["profile"] for p in desc["profiles"]] == ["4@keep0.8", "8@r2", "8"]
    g = {p["profile"]: p["gflops"] for p in desc["profiles"]}
    assert g["8"] == pytest.approx(desc["gflops_per_exit"]["8"]) and g["8@r2"] < g["8"] and g["4@keep0.8"] < g["8@r2"]
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (12, 64, 64, 3), dtype=np.uint8)
    pixels[:4] = 128  # flat images: the lowest complexity, the cheapest profile
    out = w.embed(pixels, [f"k{i}" for i in range(12)])
    profile = w.router.route_profiles(out["complexity"])
    assert (profile[:4] == 0).all() and (profile[4:] > 0).all()
    want_g = np.asarray([g[p] for p in r.profiles], np.float32)[profile] + np.float32(w.scorer_gflops)
    np.testing.assert_allclose(out["gflops"], want_g, rtol=1e-6)
    assert out["exit_layer"].tolist() == [int(r.profiles[i].split("@")[0]) for i in profile]
    # each row is its profile's embedding
    from pipeline.model.models import pixels_to_tensor

    x = pixels_to_tensor(w.bundle, pixels)
    with torch.no_grad():
        for i in range(12):
            p = parse_profile(r.profiles[profile[i]])
            want = w.encoder.forward_all_exits(x[i:i + 1], p.merge)[p.exit]
            np.testing.assert_allclose(out["embedding"][i].astype(np.float32), want[0].numpy(), atol=2e-3)


def test_calibrate_job_chooses_among_profiles(tmp_path, monkeypatch, capsys, caplog):
    import json
    import logging

    from jobs import calibrate

    monkeypatch.setenv("ICAR_CACHE_DIR", str(tmp_path / "cache"))
    shard = "/work/demo-corpus/val/00020.tar"
    import os

    if not os.path.exists(shard):
        pytest.skip("the demo corpus is not on this machine (make demo-corpus)")
    common = [shard, "--model", "demo", "--scorer", "heuristic", "--sample", "64",
              "--profiles", "4@keep0.8,4,8@r2,8"]
    with caplog.at_level(logging.WARNING, logger="icar.calibrate"):
        assert calibrate.main(common + ["--gflops-budget", "0.6", "--output", str(tmp_path / "b.json")]) == 0
    assert "use 2 merge schedules (keep0.8, r2)" in caplog.text  # each batch would run a pass per schedule
    b = json.loads((tmp_path / "b.json").read_text())
    assert b["kind"] == "profile" and b["profiles"][-1] == "8"
    assert b["calibration"]["achieved_cost_fraction"] <= 0.6 + 1e-9
    costs = b["calibration"]["gflops_per_profile"]
    assert list(costs.values()) == sorted(costs.values())
    said = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(said["sample_t2i_recall@1"]) == {"full", "routed", "profile 4@keep0.8", "profile 4", "profile 8@r2"}
    report = b["calibration"]["sample_recall"]  # captioned sample: the mix beside every cheaper profile
    assert report["kind"] == "profile" and set(report["fixed_exits"]) == {"4@keep0.8", "4", "8@r2"}
    assert all(0 < f["cost_fraction"] < 1 for f in report["fixed_exits"].values())
    assert calibrate.main(common + ["--min-recall", "0.9", "--output", str(tmp_path / "r.json")]) == 0
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["calibration"]["achieved_recall_ratio"] >= 0.9
    # the report routes the sample as the router does: its recall@10 share is the floor's achieved ratio
    assert r["calibration"]["sample_recall"]["routed_ratio"]["t2i@10"] == pytest.approx(
        r["calibration"]["achieved_recall_ratio"])
    assert r["calibration"]["sample_recall"]["full"] == report["full"]  # one sample, one full depth
    capsys.readouterr()
    assert calibrate.main([shard, "--model", "demo", "--scorer", "heuristic", "--profiles", "4,8@r2",
                           "--gflops-budget", "0.6", "--output", str(tmp_path / "x.json")]) == 2
    assert "must include the unmerged full depth 8" in capsys.readouterr().err


def test_train_exits_under_a_merge_schedule(tmp_path, monkeypatch):
    import os

    from pipeline.model import encoder as enc
    from pipeline.training import exits as et

    monkeypatch.setenv("ICAR_CACHE_DIR", str(tmp_path / "cache"))
    shard = "/work/demo-corpus/val/00020.tar"
    if not os.path.exists(shard):
        pytest.skip("the demo corpus is not on this machine (make demo-corpus)")
    cfg = et.ExitTrainConfig(inputs=[shard], output=str(tmp_path / "heads"), model="demo", exits=[4, 6, 8],
                             val_fraction=0.25, max_train=96, max_val=48, epochs=2, batch_size=32, device="cpu",
                             merge="keep0.8")
    metrics = et.train_exits(cfg)
    path = str(tmp_path / "heads" / et.HEADS)
    bundle = models.load_clip("demo", None)
    heads = enc.ExitHeads.load(path, bundle)
    assert heads.merge == "keep0.8" and heads.identity["merge"] == "keep0.8"
    assert metrics["heads"]["merge"] == "keep0.8"
    # the features were taken from merged tokens: the early features differ from unmerged ones
    encoder = enc.AdaptiveEncoder(bundle.model.visual, [4, 6, 8], heads).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        merged, full_m = encoder.exit_features(x, "keep0.8")
        plain, full_p = encoder.exit_features(x)
    assert not torch.allclose(merged[4], plain[4])
    with pytest.raises(et.TrainExitsError, match="--finetune-backbone"):
        et.train_exits(et.ExitTrainConfig(inputs=[shard], output=str(tmp_path / "ft"), model="demo",
                                          finetune_backbone=True, merge="r2", device="cpu"))


def test_one_profile_router_merges_without_a_scorer(tmp_path, monkeypatch, caplog):
    import numpy as np

    from pipeline.model import router as routers
    from pipeline.model.spec import ModelSpec
    from pipeline.model.worker import ModelWorker

    monkeypatch.setenv("ICAR_CACHE_DIR", str(tmp_path / "cache"))
    routers.save_router(routers.ProfileRouter(["8@keep0.8"], []), str(tmp_path / "merge.json"))
    w = ModelWorker(ModelSpec(model="demo", router=str(tmp_path / "merge.json"), scorer="none", device="cpu"))
    px = np.random.default_rng(1).integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
    with caplog.at_level("WARNING"):
        out = w.embed(px, [f"k{i}" for i in range(5)])
    assert "NaN" not in caplog.text
    assert out["exit_layer"].tolist() == [8] * 5
    assert out["gflops"][0] == pytest.approx(w.profiles[0]["gflops"]) and w.profiles[0]["merge"] == "keep0.8"
    assert out["gflops"][0] < 0.6 * w.gflops_per_exit[8]


@pytest.mark.slow
def test_embed_run_with_profiles_passes_the_cost_audit(tmp_path, monkeypatch, ray_session):
    import json
    import os
    import tarfile

    import pyarrow.parquet as pq

    from pipeline.model import router as routers
    from pipeline.embed.config import EmbedConfig
    from pipeline.model.spec import ModelSpec
    from pipeline.embed.execution import run_embed
    from pipeline.report.build import ReportConfig, build_report

    source = "/work/demo-corpus/test/00021.tar"
    if not os.path.exists(source):
        pytest.skip("the demo corpus is not on this machine (make demo-corpus)")
    monkeypatch.setenv("ICAR_CACHE_DIR", str(tmp_path / "cache"))
    small = tmp_path / "in" / "00000.tar"
    small.parent.mkdir()
    with tarfile.open(source) as src, tarfile.open(small, "w") as dst:
        for m in src.getmembers()[:120]:  # 40 samples: jpg, txt, json each
            dst.addfile(m, src.extractfile(m))
    r = routers.ProfileRouter(["6@keep0.8", "8@r2", "8"], [0.05, 0.15])
    routers.save_router(r, str(tmp_path / "router.json"))
    cfg = EmbedConfig(inputs=[str(small)], output=str(tmp_path / "run"), batch_size=16, progress=False,
                      spec=ModelSpec(model="demo", router=str(tmp_path / "router.json"), scorer="heuristic",
                                     device="cpu"))
    run_embed(cfg)
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    costs = {p["profile"]: p["gflops"] + info["scorer_gflops"] for p in info["profiles"]}
    assert list(costs) == r.profiles
    rows = pq.read_table(tmp_path / "run" / "shards" / "part-00000.parquet").to_pydict()
    assert len(rows["key"]) == 40
    for depth, g in zip(rows["exit_layer"], rows["gflops"]):
        assert min(abs(g - c) for p, c in costs.items() if parse_profile(p).exit == depth) < 1e-6
    # the cost audit (run by `icar embed` at the end) checks each row against its depth's profile figures
    report = build_report([str(tmp_path / "run")], ReportConfig())["runs"][0]
    audit = report["audit"]
    assert audit["status"] == "passed" and audit["agree"] and audit["row_violations"] == 0
    assert audit["gflops_recomputed"] == pytest.approx(sum(rows["gflops"]), rel=1e-6)
    # the exit mix shows what images leaving at each depth cost under their (merged) profiles, not unmerged depth
    depths = np.asarray(rows["exit_layer"])
    for e in report["exit_mix"]:
        spent = np.asarray(rows["gflops"])[depths == e["depth"]] - info["scorer_gflops"]
        assert e["encoder_gflops_per_image"] == pytest.approx(float(spent.mean()), rel=1e-5)
        if e["depth"] == 6:
            assert e["encoder_gflops_per_image"] == pytest.approx(costs["6@keep0.8"] - info["scorer_gflops"], rel=1e-5)
