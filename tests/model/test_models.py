"""pipeline.model.models: identities that pin the weights, seeded inits equal across processes, checkpoints, preprocessing."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.io.schema import model_key
from pipeline.model import models
from tinyclip import TINY


def test_seeded_init_is_deterministic_and_pinned_by_its_hash():
    a = models.bundle_from_config(TINY, seed=1)
    torch.manual_seed(12345)  # the caller's RNG state must not matter
    torch.randn(100)
    b = models.bundle_from_config(TINY, seed=1)
    c = models.bundle_from_config(TINY, seed=2)
    assert a.identity["weights_sha256"] == b.identity["weights_sha256"]
    assert a.identity["weights_sha256"] != c.identity["weights_sha256"]
    assert a.identity["pretrained"] == "none" and a.identity["seed"] == 1
    assert (a.identity["embed_dim"], a.identity["image_size"], a.identity["num_blocks"]) == (32, 32, 4)
    assert (a.embed_dim, a.image_size, a.num_blocks) == (32, 32, 4)
    # the hash follows the weights, not the way they were made
    with torch.no_grad():
        b.model.visual.proj[0, 0] += 1e-3
    assert models.weights_sha256(b.model) != a.identity["weights_sha256"]


def test_seeded_init_is_identical_in_separate_processes():
    code = textwrap.dedent(f"""
        import json, sys
        from pipeline.model import models
        tiny = json.loads({json.dumps(json.dumps(TINY))})
        print(models.bundle_from_config(tiny, seed=7).identity["weights_sha256"])
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err
        outs.append(out.split())
    here = [models.bundle_from_config(TINY, seed=7).identity["weights_sha256"]]
    assert outs[0] == outs[1] == here


def test_model_key_is_name_and_weights_hash():
    b = models.bundle_from_config(TINY, seed=0, name="tiny")
    assert model_key(b.identity) == f"tiny:{b.identity['weights_sha256']}"
    with pytest.raises(ValueError, match="weights_sha256"):
        model_key({"name": "tiny"})


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_checkpoint_roundtrip_keeps_the_identity_hash(tmp_path, suffix):
    src = models.bundle_from_config(TINY, seed=3)
    path = tmp_path / f"ckpt{suffix}"
    state = {k: v.contiguous() for k, v in src.model.state_dict().items()}
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)  # DDP-style
    loaded = models.bundle_from_config(TINY, seed=99, weights=str(path))
    assert loaded.identity["weights_sha256"] == src.identity["weights_sha256"]
    assert loaded.identity["pretrained"] == str(path)


def test_pickled_code_checkpoint_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "obj": _Payload()}, path)
    with pytest.raises(models.ModelLoadError, match="weights_only=True"):
        models.bundle_from_config(TINY, weights=str(path))


class _Payload:  # any non-tensor class instance is refused by weights_only loading
    pass


def test_model_directory_and_missing_demo(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    src = models.bundle_from_config(TINY, seed=5)
    (tmp_path / "clip_config.json").write_text(json.dumps({"model_name": "icar-tiny", "model_cfg": TINY}))
    save_file({k: v.contiguous() for k, v in src.model.state_dict().items()}, str(tmp_path / "clip.safetensors"))
    b = models.load_clip(str(tmp_path))
    assert b.identity["weights_sha256"] == src.identity["weights_sha256"]
    assert b.identity["name"] == "icar-tiny" and b.identity["pretrained"] == str(tmp_path.resolve())
    assert models.load_clip_from_identity(b.identity).identity == b.identity

    monkeypatch.setattr(models, "DEMO_DIR", tmp_path / "nothing-here")
    with pytest.raises(FileNotFoundError, match="icar train-demo"):
        models.load_clip("demo")
    monkeypatch.setattr(models, "DEMO_DIR", tmp_path)
    demo = models.load_clip("demo")
    assert demo.identity["name"] == "demo" and demo.identity["pretrained"] == "shipped"
    again = models.load_clip_from_identity(demo.identity)
    assert again.identity == demo.identity


def test_load_from_identity_rebuilds_and_verifies():
    b = models.bundle_from_config(TINY, seed=4, name="tiny")
    again = models.load_clip_from_identity(json.loads(json.dumps(b.identity)))  # as read back from run.json
    assert again.identity == b.identity
    wrong = dict(b.identity, weights_sha256="0" * 64)
    with pytest.raises(models.ModelMismatchError, match="hashes to"):
        models.load_clip_from_identity(wrong)


def test_pretrained_errors_say_what_to_do(monkeypatch):
    with pytest.raises(models.ModelLoadError, match="neither a checkpoint file nor an open_clip pretrained tag"):
        models.load_clip("ViT-B-32", "no_such_tag")
    with pytest.raises(models.ModelLoadError, match="unknown model"):
        models.load_clip("ViT-Q-99", None)
    with pytest.raises(models.ModelLoadError, match="does not exist"):
        models.bundle_from_config(TINY, weights="/nonexistent/ckpt.safetensors")

    import open_clip.factory

    def offline(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(open_clip.factory, "download_pretrained", offline)
    with pytest.raises(models.ModelLoadError, match="without internet"):
        models.load_clip("ViT-B-32", "laion2b_s34b_b79k")


def test_encode_text_is_normalised_float32():
    b = models.bundle_from_config(TINY, seed=0)
    emb = models.encode_text(b, ["a red circle", "two blue squares", "a red circle"], batch_size=2)
    assert emb.shape == (3, 32) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(emb[0], emb[2], atol=1e-6)
    assert not np.allclose(emb[0], emb[1])


def test_pixels_to_tensor_matches_open_clip_preprocess():
    from open_clip.transform import image_transform

    b = models.bundle_from_config(TINY, seed=0)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    ours = models.pixels_to_tensor(b, pixels)
    preprocess = image_transform(32, is_train=False, mean=b.mean, std=b.std)
    ref = torch.stack([preprocess(Image.fromarray(p)) for p in pixels])
    assert ours.shape == (2, 3, 32, 32) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
    assert models.pixels_to_tensor(b, pixels, channels_last=True).is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="DecodeConfig"):
        models.pixels_to_tensor(b, np.zeros((1, 64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        models.pixels_to_tensor(b, pixels.astype(np.float32))
    import warnings

    pixels.flags.writeable = False  # what a Ray actor receives from the object store
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "NumPy array is not writable" would fail here
        torch.testing.assert_close(models.pixels_to_tensor(b, pixels), ours, atol=0, rtol=0)


def test_model_directory_with_its_own_bpe_tokenizer(tmp_path):
    """The demo ships a cut-down BPE file named in clip_config.json; its token table has a few hundred rows."""
    import gzip

    from safetensors.torch import save_file

    (tmp_path / "vocab.txt.gz").write_bytes(gzip.compress(b"#version: 0.2\nr e\nc i"))  # 2 merges, no trailing newline
    cfg = json.loads(json.dumps(TINY))
    cfg["text_cfg"]["vocab_size"] = 512 + 2 + 2  # bytes, bytes</w>, 2 merges, start/end tokens
    src = models.bundle_from_config(cfg, seed=0)
    save_file({k: v.contiguous() for k, v in src.model.state_dict().items()}, str(tmp_path / "clip.safetensors"))
    (tmp_path / "clip_config.json").write_text(json.dumps({
        "model_name": "icar-bpe", "model_cfg": cfg, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.25] * 3},
        "tokenizer": {"class": "open_clip.tokenizer.SimpleTokenizer", "bpe_path": "vocab.txt.gz", "context_length": 16}}))
    b = models.load_clip(str(tmp_path))
    tokens = b.tokenizer(["a red circle, sir"])
    assert tokens.shape == (1, 16) and int(tokens.max()) < cfg["text_cfg"]["vocab_size"]
    assert models.encode_text(b, ["a red circle"]).shape == (1, 32)  # the full 49k BPE would index past the table
    assert (b.mean, b.std) == ((0.5,) * 3, (0.25,) * 3)
