"""--precision: auto is bf16 where the hardware computes it natively and fp32 elsewhere; a bf16 CPU worker casts its
weights (no autocast), keeps the exit heads' identity, and embeds close to fp32 at every exit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jobs.embed import build_parser
from pipeline.model.models import pixels_to_tensor
from pipeline.model.spec import ModelSpec
from pipeline.model.worker import ModelWorker
from pipeline.runtime import native_bf16_flags, resolve_precision

# Abridged /proc/cpuinfo of real CPUs: flags lines as the kernel writes them (tab before the colon).
ZEN4 = ("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9654 96-Core Processor\n"
        "flags\t\t: fpu vme sse2 avx avx2 avx512f avx512dq avx512_bf16 avx512_vnni vaes\n\n"
        "processor\t: 1\nflags\t\t: fpu vme sse2 avx avx2 avx512f avx512dq avx512_bf16 avx512_vnni vaes\n")
SAPPHIRE_RAPIDS = "processor\t: 0\nflags\t\t: fpu avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8\n"
CASCADE_LAKE = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512vl avx512_vnni\n"  # AVX-512, no bf16
GRAVITON3 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\nCPU implementer\t: 0x41\n"  # no x86 flags line


def test_auto_is_bf16_on_cpus_with_native_bf16():
    for text, flags in ((ZEN4, ["avx512_bf16"]), (SAPPHIRE_RAPIDS, ["avx512_bf16", "amx_bf16"])):
        assert native_bf16_flags(text) == flags
        choice = resolve_precision("auto", "cpu", cpuinfo=text)
        assert (choice.precision, choice.requested) == ("bf16", "auto")
        assert all(f in choice.reason for f in flags)


def test_auto_is_fp32_without_native_bf16():
    for text in (CASCADE_LAKE, GRAVITON3, ""):  # AVX-512 alone emulates bf16; no cpuinfo at all (not Linux)
        assert native_bf16_flags(text) == []
        choice = resolve_precision("auto", "cpu", cpuinfo=text)
        assert choice.precision == "fp32" and "avx512_bf16" in choice.reason


def test_explicit_precision_is_taken_as_given():
    for name in ("fp32", "bf16", "fp16"):
        assert resolve_precision(name, "cpu", cpuinfo=CASCADE_LAKE).precision == name
        assert resolve_precision(name.upper(), "cpu", cpuinfo=ZEN4).precision == name
    assert resolve_precision("fp32", "cpu", cpuinfo=ZEN4).precision == "fp32"  # auto never overrides a choice


def test_auto_on_cuda_follows_the_gpus_bf16_support():
    assert resolve_precision("auto", "cuda:1", cuda_bf16=True).precision == "bf16"
    assert resolve_precision("auto", "cuda", cuda_bf16=False).precision == "fp32"


def test_bad_precision_names_the_choices():
    with pytest.raises(ValueError, match="auto, fp32, bf16, fp16"):
        resolve_precision("half", "cpu", cpuinfo=ZEN4)


def test_cli_defaults_to_auto_and_refuses_others(capsys):
    assert build_parser().parse_args(["in.tar", "-o", "out"]).precision == "auto" == ModelSpec().precision
    assert build_parser().parse_args(["in.tar", "-o", "out", "--precision", "bf16"]).precision == "bf16"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["in.tar", "-o", "out", "--precision", "int8"])
    assert "invalid choice: 'int8'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def workers() -> dict[str, ModelWorker]:
    """The demo model (with its shipped exit heads) at fp32 and at bf16 on the CPU, every image at full depth."""
    return {p: ModelWorker(ModelSpec(model="demo", device="cpu", torch_threads=1, precision=p, full_depth=True))
            for p in ("fp32", "bf16")}


def test_bf16_worker_casts_its_weights_and_keeps_the_heads_identity(workers):
    w32, w16 = workers["fp32"], workers["bf16"]
    assert w16.bundle.model.visual.conv1.weight.dtype == torch.bfloat16 and w16.autocast is None
    assert w32.bundle.model.visual.conv1.weight.dtype == torch.float32
    d32, d16 = w32.describe(), w16.describe()
    assert (d32["precision"], d16["precision"]) == ("fp32", "bf16")
    # What run.json records of the model and heads does not depend on the precision a worker runs at.
    assert d16["model"] == d32["model"] and d16["heads"] == d32["heads"] and d16["heads"]["sha256"]


def test_bf16_embeddings_are_close_to_fp32_at_every_exit(workers):
    w32, w16 = workers["fp32"], workers["bf16"]
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (6, 64, 64, 3), dtype=np.uint8)
    pixels[:2] = (np.linspace(0, 255, 64)[None, :, None, None] * np.ones((2, 64, 1, 3))).astype(np.uint8)  # smooth
    with torch.inference_mode():
        a = w32.encoder.forward_all_exits(pixels_to_tensor(w32.bundle, pixels))
        b = w16.encoder.forward_all_exits(pixels_to_tensor(w16.bundle, pixels))
    assert sorted(a) == sorted(b) == w32.exits
    for e in a:
        assert b[e].dtype == torch.float32
        cos = (a[e] * b[e]).sum(1)
        assert cos.min() > 0.999, (e, cos)
        assert cos.min() < 1.0 - 1e-7, e  # bf16 really computed: not the fp32 result again
    keys = [f"k{i}" for i in range(6)]
    e32, e16 = (w.embed(pixels, keys)["embedding"].astype(np.float32) for w in (w32, w16))
    assert ((e32 * e16).sum(1) > 0.999).all()


def test_a_trained_scorer_follows_a_bf16_worker_and_scores_alike():
    from pipeline.model.scorer import DEFAULT_CHECKPOINT

    if not DEFAULT_CHECKPOINT.exists():
        pytest.skip(f"no shipped scorer checkpoint at {DEFAULT_CHECKPOINT}")
    w = {p: ModelWorker(ModelSpec(model="demo", device="cpu", torch_threads=1, precision=p, full_depth=True,
                                  scorer_checkpoint=str(DEFAULT_CHECKPOINT))) for p in ("fp32", "bf16")}
    assert (w["fp32"].scorer.dtype, w["bf16"].scorer.dtype) == (torch.float32, torch.bfloat16)
    assert w["fp32"].scorer.identity == w["bf16"].scorer.identity  # routers check it: the precision is not in it
    pixels = np.random.default_rng(1).integers(0, 256, (8, 64, 64, 3), dtype=np.uint8)
    a, b = (x.scorer.score(pixels) for x in w.values())
    assert b.dtype == np.float32 and np.abs(a - b).max() < 0.01 and not np.array_equal(a, b)
