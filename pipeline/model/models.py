"""CLIP models by name and weights: open_clip built-ins, local checkpoints, seeded random inits, the shipped demo.

Every loaded model carries an ``identity`` (what run.json records as "model") whose ``weights_sha256`` is a
hash of the weights themselves, so two processes, two nodes or two runs can check that they embed into the
same space: ``model_key(identity)`` must match between runs indexed together and an index and its query encoder.

Where the weights come from (``pretrained``):

- an open_clip pretrained tag (``laion2b_s34b_b79k``): the normal way; open_clip downloads it once into its
  cache (fails offline unless already cached; the error says what to do);
- a checkpoint file, local or any fsspec URL: ``.safetensors`` (safetensors) or ``.pt``/``.pth``/``.bin``
  (``torch.load(weights_only=True)`` only, never pickle code);
- ``"none"`` / ``None``: a random init seeded with ``seed``. The init runs on CPU from a forked, seeded RNG,
  so every process (every Ray actor on every node) holds the same weights and the same hash.

``name="demo"`` (or any directory with the same layout) loads ``clip_config.json`` + ``clip.safetensors``.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import io
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load

from pipeline.io.storage import read_bytes

# open_clip is imported inside the functions that build a model or a tokenizer: it takes ~2 s to import, and
# jobs import this module for ModelLoadError and the model helpers before (or without) building any model.

log = logging.getLogger(__name__)

DEMO_DIR = Path(__file__).parent.parent / "assets" / "demo"
DEMO_CONFIG = "clip_config.json"  # {"model_name": ..., "model_cfg": <open_clip model cfg>, "preprocess_cfg"?: {...}}
DEMO_WEIGHTS = "clip.safetensors"
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
_PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_RANDOM = ("none", "random", "")


class ModelLoadError(RuntimeError):
    """A model could not be built or its weights could not be loaded; the message says which and what to do."""


class ModelMismatchError(ValueError):
    """Weights loaded for an identity hash to something else than the identity records."""


@dataclass
class ClipBundle:
    """One loaded CLIP with what every stage needs to know about it."""

    model: torch.nn.Module  # open_clip CLIP / CustomTextCLIP, eval mode, on its device
    tokenizer: Any  # open_clip tokenizer: tokenizer(list[str]) -> LongTensor (N, context_length)
    identity: dict  # run.json "model": name, pretrained, [seed], weights_sha256, embed_dim, image_size, num_blocks
    image_size: int  # square input side S the vision tower takes
    mean: tuple[float, float, float]  # per-channel normalisation mean (of pixels / 255)
    std: tuple[float, float, float]  # per-channel normalisation std
    embed_dim: int  # joint embedding dimension D
    num_blocks: int  # transformer blocks in the vision tower (full depth)
    device: str = "cpu"  # where the model lives
    dtype: torch.dtype = field(default=torch.float32)  # parameter dtype (precision)
    source_dir: str | None = None  # model directory it was loaded from (demo or clip_config.json folder), if any
    config_doc: dict | None = None  # that directory's clip_config.json (tools writing derived models copy it)


# ----------------------------------------------------------------------------------------------- identity

def weights_sha256(model: torch.nn.Module) -> str:
    """Return the SHA-256 of the model's state_dict: key, dtype, shape and raw bytes of each tensor, keys sorted.

    Independent of the file format the weights came from (a .pt and a .safetensors of the same weights hash
    alike) and cheap (one pass over the bytes, ~1 s for ViT-L-14). Hash before casting to fp16/bf16, so the
    identity does not depend on the precision a worker runs at.
    """
    h = hashlib.sha256()
    state = model.state_dict()
    for key in sorted(state):
        t = state[key].detach()
        h.update(key.encode())
        h.update(f"|{str(t.dtype).removeprefix('torch.')}|{tuple(t.shape)}|".encode())
        flat = t.to("cpu").contiguous().reshape(-1)
        if flat.numel():
            h.update(flat.view(torch.uint8).numpy().data)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------- building

def create_from_config(cfg: dict, seed: int = 0, load_pretrained_text: bool = False) -> torch.nn.Module:
    """Return a CLIP (or CustomTextCLIP) built from an open_clip model cfg dict, randomly initialised from ``seed``.

    ``cfg`` holds ``embed_dim``, ``vision_cfg``, ``text_cfg`` (and optionally ``quick_gelu``, ``custom_text``,
    ...), as in open_clip's ``model_configs/*.json``. A text tower from Hugging Face (``text_cfg.hf_model_name``,
    e.g. a local folder) is built from its config only, unless ``load_pretrained_text`` (the demo trainer's
    locked-text recipe). The init runs on CPU inside a forked RNG, so the caller's RNG state is untouched and
    the same seed gives the same weights in every process.
    """
    import open_clip  # lazy: ~2 s (see the top of the module)

    cfg = copy.deepcopy(cfg)
    for required in ("embed_dim", "vision_cfg", "text_cfg"):
        if required not in cfg:
            raise ValueError(f"open_clip model cfg lacks '{required}': keys are {sorted(cfg)}")
    text_cfg = cfg["text_cfg"]
    is_hf_text = "hf_model_name" in text_cfg
    if is_hf_text:
        text_cfg["hf_model_pretrained"] = bool(load_pretrained_text)
    if "timm_model_name" in cfg["vision_cfg"]:
        cfg["vision_cfg"]["timm_model_pretrained"] = False
    custom_text = cfg.pop("custom_text", False) or is_hf_text
    cls = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
    if "multimodal_cfg" in cfg:
        cls = open_clip.CoCa
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(**cfg)
    return model


def _tokenizer_for_cfg(cfg: dict):
    """Return the tokenizer open_clip would pick for a model cfg (HF tokenizer if named, else CLIP BPE)."""
    text_cfg = cfg.get("text_cfg", {})
    return _tokenizer(text_cfg.get("hf_tokenizer_name") or "", int(text_cfg.get("context_length", 77)),
                      text_cfg.get("tokenizer_mode"), json.dumps(text_cfg.get("tokenizer_kwargs", {}), sort_keys=True))


@functools.lru_cache(maxsize=8)
def _tokenizer(hf_name: str, context_length: int, mode: str | None, kwargs_json: str, bpe_path: str = ""):
    """Return a tokenizer, built once per process (the BPE vocabulary takes a second or two to load)."""
    from open_clip.tokenizer import HFTokenizer, SimpleTokenizer  # lazy: ~2 s (see the top of the module)

    kwargs = json.loads(kwargs_json)
    if hf_name:
        return HFTokenizer(hf_name, context_length=context_length, tokenizer_mode=mode, **kwargs)
    if bpe_path:
        kwargs["bpe_path"] = bpe_path
    return SimpleTokenizer(context_length=context_length, **kwargs)


def _tokenizer_for_doc(doc: dict, directory: Path):
    """Return the tokenizer a model directory's clip_config.json names ("tokenizer" entry), else the cfg's default.

    ``{"tokenizer": {"class": "open_clip.tokenizer.SimpleTokenizer", "bpe_path": "vocab.txt.gz",
    "context_length": 40}}``: paths are relative to the directory (the demo ships a cut-down BPE file).
    ``"class": "...HFTokenizer"`` takes ``"name"`` (a hub id or a folder, relative to the directory if it exists).
    """
    spec = doc.get("tokenizer")
    cfg = doc["model_cfg"]
    if not spec:
        return _tokenizer_for_cfg(cfg)
    cls = str(spec.get("class", "SimpleTokenizer")).rsplit(".", 1)[-1]
    context_length = int(spec.get("context_length") or cfg.get("text_cfg", {}).get("context_length", 77))
    if cls == "SimpleTokenizer":
        bpe = spec.get("bpe_path") or ""
        if bpe and not os.path.isabs(bpe):
            bpe = str(directory / bpe)
        if bpe and not os.path.isfile(bpe):
            raise ModelLoadError(f"{directory / DEMO_CONFIG} names tokenizer file {bpe}, which does not exist")
        return _tokenizer("", context_length, None, "{}", bpe)
    if cls == "HFTokenizer":
        name = str(spec["name"])
        if (directory / name).exists():
            name = str(directory / name)
        return _tokenizer(name, context_length, spec.get("tokenizer_mode"), "{}")
    raise ModelLoadError(f"{directory / DEMO_CONFIG}: tokenizer class {spec.get('class')!r} is not supported "
                         f"(SimpleTokenizer with bpe_path, or HFTokenizer with name)")


def _is_checkpoint_ref(pretrained: str) -> bool:
    """Return True when ``pretrained`` names a checkpoint file (by suffix or because the file exists)."""
    return pretrained.lower().endswith(CHECKPOINT_SUFFIXES) or "://" in pretrained or os.path.isfile(pretrained)


def load_state_dict(url: str) -> dict[str, torch.Tensor]:
    """Return the state_dict in a .safetensors or torch checkpoint at ``url`` (torch.load with weights_only=True)."""
    try:
        data = read_bytes(url)
    except FileNotFoundError as e:
        raise ModelLoadError(f"checkpoint {url} does not exist; pass an existing .safetensors/.pt path, an "
                             f"open_clip pretrained tag, or 'none' for a seeded random init") from e
    if url.lower().endswith(".safetensors"):
        state = st_load(data)
    else:
        try:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as e:  # pickle with code, or not a torch file at all
            raise ModelLoadError(
                f"cannot read {url} with torch.load(weights_only=True): {type(e).__name__}: {e}. Only plain "
                "tensor checkpoints are accepted; re-save it as safetensors (safetensors.torch.save_file)") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state:
        raise ModelLoadError(f"{url} holds no state_dict (got {type(state).__name__})")
    if all(k.startswith("module.") for k in state):  # saved from DDP
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _load_weights(model: torch.nn.Module, url: str) -> None:
    """Load the checkpoint at ``url`` into ``model`` strictly, converting old open_clip layouts like open_clip does."""
    from open_clip.factory import convert_state_dict, resize_pos_embed, resize_text_pos_embed  # lazy: ~2 s (top)

    state = load_state_dict(url)
    state = convert_state_dict(model, state)
    if "logit_scale" in state and getattr(model, "logit_scale", None) is not None \
            and model.logit_scale.ndim != state["logit_scale"].ndim:
        state["logit_scale"] = state["logit_scale"].reshape(model.logit_scale.shape)
    resize_pos_embed(state, model)
    resize_text_pos_embed(state, model)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelLoadError(f"checkpoint {url} does not fit this model architecture: {e}") from e


def _vision_facts(model: torch.nn.Module) -> tuple[int, int, int]:
    """Return (image_size, embed_dim, num_blocks) of a CLIP's vision tower."""
    visual = model.visual
    size = visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    if isinstance(visual.image_size, (tuple, list)) and visual.image_size[0] != visual.image_size[1]:
        raise ModelLoadError(f"non-square image size {visual.image_size} is not supported (decode crops squares)")
    blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    num_blocks = len(blocks) if blocks is not None else 0
    embed_dim = int(getattr(visual, "output_dim", 0) or model.text_projection.shape[-1])
    return int(size), embed_dim, num_blocks


def _finish(model: torch.nn.Module, tokenizer, identity_base: dict, device: str, precision: str,
            preprocess: dict | None = None) -> ClipBundle:
    """Return the bundle for a CPU fp32 ``model``: hash its weights, then move and cast it."""
    if precision not in _PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {sorted(_PRECISIONS)}")
    model.eval()
    image_size, embed_dim, num_blocks = _vision_facts(model)
    identity = dict(identity_base)
    identity.update(weights_sha256=weights_sha256(model), embed_dim=embed_dim, image_size=image_size,
                    num_blocks=num_blocks)
    pre = dict(getattr(model.visual, "preprocess_cfg", None) or {})
    pre.update(preprocess or {})
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD  # lazy: ~2 s (top)

    mean = tuple(float(v) for v in pre.get("mean", OPENAI_DATASET_MEAN))
    std = tuple(float(v) for v in pre.get("std", OPENAI_DATASET_STD))
    dtype = _PRECISIONS[precision]
    model = model.to(device=device, dtype=dtype)
    for p in model.parameters():  # inference by default; trainers switch on what they train
        p.requires_grad_(False)
    return ClipBundle(model=model, tokenizer=tokenizer, identity=identity, image_size=image_size, mean=mean,
                      std=std, embed_dim=embed_dim, num_blocks=num_blocks, device=str(device), dtype=dtype)


def bundle_from_config(cfg: dict, seed: int = 0, name: str = "custom", device: str = "cpu",
                       precision: str = "fp32", weights: str | None = None) -> ClipBundle:
    """Return a bundle for a model built from an open_clip cfg dict (random init from ``seed``, or ``weights``).

    The identity carries the cfg itself ("model_cfg"), so ``load_clip_from_identity`` can rebuild it anywhere.
    """
    model = create_from_config(cfg, seed)
    base: dict = {"name": name, "model_cfg": copy.deepcopy(cfg)}
    if weights:
        _load_weights(model, weights)
        base["pretrained"] = weights
    else:
        base.update(pretrained="none", seed=int(seed))
    return _finish(model, _tokenizer_for_cfg(cfg), base, device, precision, cfg.get("preprocess_cfg"))


def _is_model_dir(path: str | None) -> bool:
    """Return True when ``path`` is a local directory holding a clip_config.json."""
    return bool(path) and os.path.isdir(path) and (Path(path) / DEMO_CONFIG).is_file()


def _load_dir(directory: Path, demo: bool, device: str, precision: str) -> ClipBundle:
    """Return the bundle stored in a model directory (clip_config.json + clip.safetensors), e.g. the demo.

    Identity: the demo is {"name": "demo", "pretrained": "shipped"}; any other directory is
    {"name": its config's model_name, "pretrained": the directory's absolute path}, so the model key does not
    depend on where the directory lies and ``load_clip(name, pretrained=directory)`` loads it again.
    """
    config_path, weights_path = directory / DEMO_CONFIG, directory / DEMO_WEIGHTS
    if not config_path.is_file() or not weights_path.is_file():
        hint = ("build them with `icar train-demo` (it writes pipeline/assets/demo/), or pass an open_clip model "
                "name such as --model ViT-B-32 --pretrained none") if demo else             f"a model directory needs {DEMO_CONFIG} and {DEMO_WEIGHTS}"
        raise FileNotFoundError(f"model '{'demo' if demo else directory}': {config_path} / {weights_path} not "
                                f"found: {hint}")
    doc = json.loads(config_path.read_text())
    if "model_cfg" not in doc:
        raise ModelLoadError(f"{config_path} lacks 'model_cfg' (an open_clip model config dict)")
    cfg = doc["model_cfg"]
    model = create_from_config(cfg, seed=0)
    _load_weights(model, str(weights_path))
    if demo:
        base = {"name": "demo", "config_name": doc.get("model_name", "demo"), "pretrained": "shipped"}
    else:
        base = {"name": str(doc.get("model_name") or directory.resolve().name),
                "pretrained": str(directory.resolve())}
    bundle = _finish(model, _tokenizer_for_doc(doc, directory), base, device, precision,
                     doc.get("preprocess_cfg") or cfg.get("preprocess_cfg"))
    bundle.source_dir, bundle.config_doc = str(directory.resolve()), doc
    return bundle


def load_clip(name: str = "demo", pretrained: str | None = None, seed: int = 0, device: str = "cpu",
              precision: str = "fp32") -> ClipBundle:
    """Return the CLIP ``name`` with weights from ``pretrained`` (tag, checkpoint, or none = seeded random init).

    ``name``: an open_clip model name (ViT-B-32, ViT-L-14, ...), "demo" (the shipped model), or a model
    directory holding clip_config.json + clip.safetensors (``pretrained`` may name that directory instead, as
    identities of directory models do). ``precision`` casts the parameters after hashing them.
    """
    import open_clip  # lazy: ~2 s (see the top of the module)

    if name == "demo":
        if pretrained not in (None, "none", "shipped"):
            raise ValueError(f"the demo model carries its own weights; do not pass pretrained={pretrained!r}")
        return _load_dir(DEMO_DIR, True, device, precision)
    if _is_model_dir(name) or _is_model_dir(pretrained):
        directory = Path(name if _is_model_dir(name) else pretrained)
        if _is_model_dir(name) and pretrained not in (None, "none") and not _is_model_dir(pretrained):
            raise ValueError(f"model directory {name} carries its own weights; do not pass pretrained={pretrained!r}")
        return _load_dir(directory, False, device, precision)

    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ModelLoadError(f"unknown model '{name}': use 'demo', a model directory, or an open_clip name such "
                             f"as ViT-B-32 / ViT-B-16 / ViT-L-14 (open_clip.list_models() lists them)")
    tokenizer = open_clip.get_tokenizer(name)
    if pretrained is None or str(pretrained).lower() in _RANDOM:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = open_clip.create_model(name, pretrained=None, device="cpu", pretrained_text=False)
        base = {"name": name, "pretrained": "none", "seed": int(seed)}
    elif _is_checkpoint_ref(pretrained):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = open_clip.create_model(name, pretrained=None, device="cpu", pretrained_text=False)
        _load_weights(model, pretrained)
        base = {"name": name, "pretrained": pretrained if "://" in pretrained else os.path.abspath(pretrained)}
    else:
        tags = open_clip.list_pretrained_tags_by_model(name)
        if pretrained not in tags:
            raise ModelLoadError(f"'{pretrained}' is neither a checkpoint file nor an open_clip pretrained tag of "
                                 f"{name} (tags: {tags}); pass a tag, a .safetensors/.pt path, or 'none'")
        try:
            model = open_clip.create_model(name, pretrained=pretrained, device="cpu")
        except Exception as e:  # download failures come as RuntimeError/OSError/HF errors alike
            raise ModelLoadError(
                f"cannot fetch open_clip weights {name}/{pretrained}: {type(e).__name__}: {e}. On a machine "
                "without internet, download them once elsewhere (open_clip.create_model(name, pretrained=tag) "
                "caches them under ~/.cache/huggingface) and copy that cache here, or pass the checkpoint file "
                "path as --pretrained /path/open_clip_model.safetensors") from e
        base = {"name": name, "pretrained": pretrained}
    return _finish(model, tokenizer, base, device, precision)


def load_clip_from_identity(identity: dict, device: str = "cpu", precision: str = "fp32") -> ClipBundle:
    """Return the model a run.json / index.json "model" dict names; raise ModelMismatchError if its weights differ."""
    name = identity.get("name")
    if not name:
        raise ValueError(f"model identity has no name: {identity!r}")
    pretrained = identity.get("pretrained")
    if "model_cfg" in identity:
        weights = None if pretrained in (None, "none") else pretrained
        bundle = bundle_from_config(identity["model_cfg"], seed=int(identity.get("seed", 0)), name=name,
                                    device=device, precision=precision, weights=weights)
    else:
        bundle = load_clip(name, None if pretrained == "shipped" else pretrained, seed=int(identity.get("seed", 0)),
                           device=device, precision=precision)
    want, got = identity.get("weights_sha256"), bundle.identity["weights_sha256"]
    if want and want != got:
        raise ModelMismatchError(
            f"model {name} (pretrained={pretrained!r}) loaded here hashes to {got[:16]}… but the run/index was "
            f"made with weights {want[:16]}…: the checkpoint changed, the seed differs, or the torch/open_clip "
            f"version initialises differently; use the exact weights the run used")
    return bundle


# ----------------------------------------------------------------------------------------------- use

@torch.no_grad()
def encode_text(bundle: ClipBundle, texts: list[str], batch_size: int = 256) -> np.ndarray:
    """Return float32 L2-normalised text embeddings (N, D) of ``texts``."""
    if isinstance(texts, str):
        raise TypeError("encode_text takes a list of strings, not one string")
    out = np.empty((len(texts), bundle.embed_dim), np.float32)
    for s in range(0, len(texts), batch_size):
        tokens = bundle.tokenizer(list(texts[s:s + batch_size])).to(bundle.device)
        emb = bundle.model.encode_text(tokens).float()
        out[s:s + len(tokens)] = torch.nn.functional.normalize(emb, dim=-1).cpu().numpy()
    return out


def pixels_to_tensor(bundle: ClipBundle, pixels_uint8: np.ndarray | torch.Tensor, device: str | None = None,
                     dtype: torch.dtype = torch.float32, channels_last: bool = False) -> torch.Tensor:
    """Return the normalised float tensor (N, 3, S, S) for decoded uint8 pixels (N, S, S, 3): /255, then (x-mean)/std.

    The uint8 batch moves to ``device`` first (4x fewer bytes over PCIe than floats), then is converted there. A
    uint8 tensor (pixels decoded on the model's device, pipeline.model.device_decode) is taken where it lies.
    """
    if isinstance(pixels_uint8, torch.Tensor) and pixels_uint8.dtype == torch.uint8 and pixels_uint8.ndim == 4 \
            and pixels_uint8.shape[-1] == 3 and tuple(pixels_uint8.shape[1:3]) == (bundle.image_size,) * 2:
        x = pixels_uint8.to(device or pixels_uint8.device, non_blocking=True)
        return _normalise(bundle, x, dtype, channels_last)
    if not isinstance(pixels_uint8, np.ndarray) or pixels_uint8.dtype != np.uint8 or pixels_uint8.ndim != 4 \
            or pixels_uint8.shape[-1] != 3:
        raise ValueError(f"pixels must be a uint8 array (N, S, S, 3), got "
                         f"{getattr(pixels_uint8, 'dtype', type(pixels_uint8))} {getattr(pixels_uint8, 'shape', '')}")
    s = bundle.image_size
    if pixels_uint8.shape[1:3] != (s, s):
        raise ValueError(f"pixels are {pixels_uint8.shape[1]}x{pixels_uint8.shape[2]} but the model takes {s}x{s}; "
                         f"decode with DecodeConfig(image_size={s})")
    if not pixels_uint8.flags.writeable:  # Ray's object-store views: torch warns on sharing read-only memory
        pixels_uint8 = pixels_uint8.copy()
    x = torch.from_numpy(np.ascontiguousarray(pixels_uint8)).to(device or "cpu", non_blocking=True)
    return _normalise(bundle, x, dtype, channels_last)


def _normalise(bundle: ClipBundle, x: torch.Tensor, dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    """Return uint8 pixels ``x`` (N, S, S, 3) as the model's normalised input (N, 3, S, S), on x's device."""
    x = x.permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
    mean = torch.tensor(bundle.mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(bundle.std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    x = ((x - mean) / std).to(dtype)
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
