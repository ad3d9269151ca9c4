"""oneDNN CPU blocks (pipeline.model.cpu_blocks): the same function as open_clip's blocks at every exit, in float32
and bfloat16, for GELU, QuickGELU and LayerScale towers; anything else keeps the stock blocks and says why."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from pipeline.model import cpu_blocks
from pipeline.model import encoder as enc
from pipeline.model import models
from pipeline.model.spec import ModelSpec
from pipeline.model.worker import ModelWorker
from tests.helpers.tinyclip import TINY, tiny

pytestmark = pytest.mark.skipif(cpu_blocks._linear_op() is None, reason="this torch build has no oneDNN linear")


def _bundle(quick_gelu: bool = False, **vision) -> models.ClipBundle:
    cfg = copy.deepcopy(TINY)
    cfg["vision_cfg"].update(vision)
    cfg["quick_gelu"] = quick_gelu
    return models.bundle_from_config(cfg, seed=3, name="tiny")


def _pixels(bundle, n: int = 6) -> torch.Tensor:
    return torch.randn(n, 3, bundle.image_size, bundle.image_size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("variant", [{}, {"quick_gelu": True}, {"ls_init_value": 0.5}])
def test_every_exit_matches_the_stock_blocks_in_float32(monkeypatch, variant):
    monkeypatch.delenv(cpu_blocks.ENV, raising=False)
    bundle = _bundle(**variant)
    encoder = enc.AdaptiveEncoder(bundle.model.visual, [2, 3, 4]).eval()
    kernels = cpu_blocks.fast_blocks(encoder.visual.transformer.resblocks, "cpu")
    assert kernels.kernels == "onednn" and len(kernels.blocks) == 4, kernels.reason
    x = _pixels(bundle)
    depths = torch.tensor([2, 4, 3, 4, 2, 3])
    with torch.inference_mode():
        stock_all = encoder.forward_all_exits(x)
        stock = encoder(x, depths)
        encoder.inference_blocks = kernels.blocks
        fast_all = encoder.forward_all_exits(x)
        fast = encoder(x, depths)
    for e in (2, 3, 4):
        assert torch.allclose(fast_all[e], stock_all[e], atol=2e-6), e
    assert torch.allclose(fast, stock, atol=2e-6)
    assert not torch.equal(stock_all[2], stock_all[4])  # the exits differ: the comparison above can fail


def test_bfloat16_tower_stays_within_bfloat16_rounding(monkeypatch):
    monkeypatch.delenv(cpu_blocks.ENV, raising=False)
    bundle = models.bundle_from_config(TINY, seed=3, name="tiny", precision="bf16")
    visual = bundle.model.visual.eval()
    packed = cpu_blocks.fast_blocks(visual.transformer.resblocks, "cpu")
    assert packed.kernels == "onednn" and "packed" in packed.reason, packed.reason
    monkeypatch.setenv(cpu_blocks.ENV, "onednn-inplace")
    inplace = cpu_blocks.fast_blocks(visual.transformer.resblocks, "cpu")
    assert inplace.kernels == "onednn" and "in place" in inplace.reason, inplace.reason
    x = _pixels(bundle).to(torch.bfloat16)
    stock_blocks = visual.transformer.resblocks
    with torch.inference_mode():
        stock = visual(x).float()
        for kernels in (packed, inplace):
            visual.transformer.resblocks = torch.nn.ModuleList(kernels.blocks)
            fast = visual(x).float()
            small = visual(x[:3]).float()  # another batch size than the packed layout's hint
            visual.transformer.resblocks = stock_blocks
            assert torch.nn.functional.cosine_similarity(stock, fast).min().item() > 0.999, kernels.reason
            assert torch.nn.functional.cosine_similarity(stock[:3], small).min().item() > 0.999, kernels.reason


def test_a_wrong_block_is_caught_by_the_check_batch():
    a, b = tiny(seed=0).model.visual.transformer.resblocks, tiny(seed=1).model.visual.transformer.resblocks
    linear = cpu_blocks._linear_op()
    assert cpu_blocks._disagreement(a[0], cpu_blocks.OneDnnBlock(a[0], linear)) is None
    problem = cpu_blocks._disagreement(a[0], cpu_blocks.OneDnnBlock(b[0], linear))
    assert problem is not None and "relative error" in problem


def test_off_switch_other_devices_and_unsupported_blocks(monkeypatch):
    blocks = tiny().model.visual.transformer.resblocks
    monkeypatch.setenv(cpu_blocks.ENV, "torch")
    off = cpu_blocks.fast_blocks(blocks, "cpu")
    assert off.blocks is None and off.kernels == "torch" and "ICAR_CPU_KERNELS=torch" in off.reason
    monkeypatch.setenv(cpu_blocks.ENV, "fastest")
    with pytest.raises(ValueError, match="ICAR_CPU_KERNELS='fastest'"):
        cpu_blocks.fast_blocks(blocks, "cpu")
    monkeypatch.delenv(cpu_blocks.ENV)
    assert "CPU path" in cpu_blocks.fast_blocks(blocks, "cuda:0").reason
    from open_clip.transformer import CustomResidualAttentionBlock

    custom = torch.nn.ModuleList([CustomResidualAttentionBlock(64, 2, scale_attn=True)])
    assert "no nn.MultiheadAttention" in cpu_blocks.fast_blocks(custom, "cpu").reason
    odd = copy.deepcopy(blocks)
    odd[1].mlp.add_module("drop", torch.nn.Dropout(0.0))  # c_fc -> gelu -> c_proj -> drop: not the stock MLP
    chosen = cpu_blocks.fast_blocks(odd, "cpu")
    assert chosen.blocks is None and chosen.reason.startswith("block 1: its MLP")


def test_worker_uses_and_records_the_kernels(monkeypatch):
    monkeypatch.delenv(cpu_blocks.ENV, raising=False)
    spec = ModelSpec(model="demo", precision="fp32", torch_threads=1, full_depth=True, scorer="none")
    fast = ModelWorker(spec)
    assert fast.describe()["block_kernels"]["kernels"] == "onednn"
    pixels = np.random.default_rng(0).integers(0, 256, (5, fast.bundle.image_size, fast.bundle.image_size, 3),
                                               dtype=np.uint8)
    keys = [str(i) for i in range(5)]
    a = np.asarray(fast.embed(pixels, keys)["embedding"], np.float32)
    monkeypatch.setenv(cpu_blocks.ENV, "torch")
    stock = ModelWorker(spec)
    assert stock.describe()["block_kernels"] == {"kernels": "torch", "reason": "ICAR_CPU_KERNELS=torch"}
    b = np.asarray(stock.embed(pixels, keys)["embedding"], np.float32)
    np.testing.assert_allclose(a, b, atol=1e-3)  # float16 shards: one unit in the last place at most
