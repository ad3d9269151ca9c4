"""pipeline.model.encoder: full depth is the unmodified tower, early exits pool the class token, no wasted block."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from pipeline.model import encoder as enc
from pipeline.io.schema import model_key
from pipeline.model import models, tower
from tinyclip import tiny


@pytest.fixture(scope="module")
def vit_b32():
    return models.load_clip("ViT-B-32", None, seed=0)


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_default_exits_and_validation():
    assert enc.default_exits(24) == [12, 18, 24]
    assert enc.default_exits(12) == [6, 9, 12]
    assert enc.default_exits(4) == [2, 3, 4]
    assert enc.default_exits(1) == [1]
    for bad, msg in [([9, 6, 12], "sorted"), ([6, 6, 12], "unique"), ([0, 12], "1..12"), ([6, 13], "1..12"),
                     ([6, 9], "last exit must be the full depth"), ([], "empty"), (["a"], "integers")]:
        with pytest.raises(ValueError, match=msg):
            enc.validate_exits(bad, 12)


def test_full_depth_equals_encode_image_vit_b32(vit_b32):
    x = _images(2, 224)
    encoder = enc.AdaptiveEncoder(vit_b32.model.visual, [6, 9, 12]).eval()
    with torch.no_grad():
        ref = F.normalize(vit_b32.model.encode_image(x), dim=-1)
        out = encoder(x, torch.full((2,), 12))
    assert out.dtype == torch.float32 and out.shape == (2, 512)
    assert (out - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("vision", [{}, {"pool_type": "avg"}, {"pool_type": "avg", "final_ln_after_pool": True},
                                    {"ls_init_value": 0.1}, {"patch_dropout": 0.5}])  # patch dropout: off in eval
def test_full_depth_equals_encode_image_custom(vision):
    b = tiny(**vision)
    x = _images(4, 32)
    encoder = enc.AdaptiveEncoder(b.model.visual, [1, 2, 4]).eval()
    with torch.no_grad():
        ref = F.normalize(b.model.encode_image(x), dim=-1)
        out = encoder(x, torch.full((4,), 4))
        assert (out - ref).abs().max().item() < 1e-5
        # an exit head initialised from ln_post/proj and applied to the last block's tokens is the tower's own pooling
        head = tower.ExitHead(b.model.visual)
        tokens = b.model.visual.transformer(b.model.visual._embeds(x))
        assert (F.normalize(head(tokens), dim=-1) - ref).abs().max().item() < 1e-5


def test_mixed_batch_rows_equal_their_own_depth():
    b = tiny(seed=1)
    x = _images(7, 32, seed=1)
    encoder = enc.AdaptiveEncoder(b.model.visual, [1, 2, 4]).eval()
    depths = torch.tensor([4, 1, 2, 1, 4, 2, 1])
    with torch.no_grad():
        out = encoder(x, depths)
        every = encoder.forward_all_exits(x)
    for i, d in enumerate(depths.tolist()):
        assert (out[i] - every[d][i]).abs().max().item() < 1e-5, (i, d)
    # the depths really differ: an early row is not its full-depth embedding
    assert (every[1][1] - every[4][1]).abs().max().item() > 1e-3
    torch.testing.assert_close(out.norm(dim=1), torch.ones(7))


def test_no_block_runs_twice_and_no_image_runs_past_its_exit():
    b = tiny(seed=2)
    visual = b.model.visual
    rows = [0] * 4
    hooks = [blk.register_forward_hook(lambda m, i, o, k=k: rows.__setitem__(k, rows[k] + i[0].shape[0]))
             for k, blk in enumerate(visual.transformer.resblocks)]
    try:
        encoder = enc.AdaptiveEncoder(visual, [1, 2, 4]).eval()
        with torch.no_grad():
            encoder(_images(6, 32), torch.tensor([1, 4, 2, 1, 1, 4]))
        # 6 images run block 1; 3 leave at 1, so 3 run block 2; 1 leaves at 2, so 2 run blocks 3 and 4
        assert rows == [6, 3, 2, 2]
        rows[:] = [0] * 4
        with torch.no_grad():
            encoder(_images(3, 32), torch.tensor([1, 1, 1]))
        assert rows == [3, 0, 0, 0]  # nobody continues: blocks 2-4 never run
    finally:
        for h in hooks:
            h.remove()


def test_early_exit_pools_the_class_token_not_a_patch_token():
    b = tiny(seed=3)
    visual = b.model.visual
    x = _images(2, 32, seed=3)
    encoder = enc.AdaptiveEncoder(visual, [2, 4]).eval()
    with torch.no_grad():
        tokens = visual._embeds(x)
        for blk in visual.transformer.resblocks[:2]:
            tokens = blk(tokens)
        cls_tok, patch0 = tokens[:, 0], tokens[:, 1]
        assert (cls_tok - patch0).abs().max() > 1e-2  # the two candidates differ
        want = F.normalize(visual.ln_post(cls_tok) @ visual.proj, dim=-1)
        wrong = F.normalize(visual.ln_post(patch0) @ visual.proj, dim=-1)  # what forward_intermediates would give
        out = encoder(x, torch.tensor([2, 2]))
    assert (out - want).abs().max().item() < 1e-5
    assert (out - wrong).abs().max().item() > 1e-2


def test_avg_pool_early_exit_averages_layer_normed_patch_tokens():
    b = tiny(seed=4, pool_type="avg")
    visual = b.model.visual
    x = _images(2, 32, seed=4)
    encoder = enc.AdaptiveEncoder(visual, [2, 4]).eval()
    with torch.no_grad():
        tokens = visual._embeds(x)
        for blk in visual.transformer.resblocks[:2]:
            tokens = blk(tokens)
        want = F.normalize(visual.ln_post(tokens)[:, 1:].mean(1) @ visual.proj, dim=-1)
        out = encoder(x, torch.tensor([2, 2]))
    assert (out - want).abs().max().item() < 1e-5


def test_unsupported_towers_are_refused_clearly():
    from open_clip.transformer import VisionTransformer

    coca_like = VisionTransformer(image_size=32, patch_size=8, width=64, layers=2, heads=2, mlp_ratio=4.0,
                                  attentional_pool=True, attn_pooler_queries=4, attn_pooler_heads=2, output_dim=32)
    with pytest.raises(NotImplementedError, match="attentional pooler"):
        enc.AdaptiveEncoder(coca_like, [1, 2])
    full_only = enc.AdaptiveEncoder(coca_like, [2]).eval()  # full depth alone is the tower itself
    x = _images(2, 32)
    with torch.no_grad():
        torch.testing.assert_close(full_only(x, torch.tensor([2, 2])), F.normalize(coca_like(x), dim=-1))
    with pytest.raises(TypeError, match="VisionTransformer"):
        enc.AdaptiveEncoder(torch.nn.Linear(2, 2), [1])


def test_bad_exit_layers_and_empty_batch():
    b = tiny()
    encoder = enc.AdaptiveEncoder(b.model.visual, [2, 4]).eval()
    with pytest.raises(ValueError, match=r"depths \[3\]"):
        encoder(_images(2, 32), torch.tensor([3, 4]))
    with pytest.raises(ValueError, match="3 entries for a batch of 2"):
        encoder(_images(2, 32), torch.tensor([2, 4, 4]))
    assert encoder(_images(0, 32), torch.tensor([], dtype=torch.long)).shape == (0, 32)


def test_heads_save_load_and_refuse_another_backbone(tmp_path):
    b = tiny(seed=5)
    heads = enc.ExitHeads.for_bundle(b, [1, 2, 4])
    with torch.no_grad():
        heads.head(2).proj.add_(torch.randn_like(heads.head(2).proj))  # trained heads differ from the tower's own ln_post/proj
    path = str(tmp_path / "heads.safetensors")
    ident = heads.save(path)
    assert ident["exits"] == [1, 2, 4] and ident["backbone"] == model_key(b.identity)
    assert ident["path"] == path and len(ident["sha256"]) == 64

    loaded = enc.ExitHeads.load(path, b)
    assert loaded.identity == ident
    x = _images(3, 32)
    with torch.no_grad():
        a = enc.AdaptiveEncoder(b.model.visual, [1, 2, 4], heads).eval()(x, torch.tensor([2, 1, 4]))
        c = enc.AdaptiveEncoder(b.model.visual, [1, 2, 4], loaded).eval()(x, torch.tensor([2, 1, 4]))
        untrained = enc.AdaptiveEncoder(b.model.visual, [1, 2, 4]).eval()(x, torch.tensor([2, 1, 4]))
    torch.testing.assert_close(a, c)
    assert (a[0] - untrained[0]).abs().max() > 1e-3

    other = tiny(seed=6)
    with pytest.raises(enc.HeadsMismatchError, match="trained for backbone tiny:.*but the model loaded is tiny:"):
        enc.ExitHeads.load(path, other)
    # a subset of the trained exits is fine; an exit without a head is not
    enc.AdaptiveEncoder(b.model.visual, [2, 4], loaded)
    with pytest.raises(ValueError, match="no head for exits \\[3\\]"):
        enc.AdaptiveEncoder(b.model.visual, [1, 3, 4], loaded)
    bogus = tmp_path / "bogus.safetensors"
    bogus.write_bytes(b"\x00" * 4)
    with pytest.raises(ValueError, match="not an exit-heads"):
        enc.ExitHeads.load(str(bogus), b)
    with pytest.raises(ValueError, match="do not know their backbone"):
        enc.ExitHeads(b.model.visual, [2, 4]).save(str(tmp_path / "x.safetensors"))
