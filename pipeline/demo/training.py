"""Train the shipped demo CLIP from scratch on the demo corpus, with open_clip's own model and loss, on CPU.

The recipe, in the order it runs:

1. Read the corpus's train split (and the val split for evaluation) with the project's readers, decode each JPEG
   once with the project's decoder at the model's input size (so training sees exactly what `icar embed` will
   feed the model), and keep the uint8 pixels in memory (20k x 64 x 64 x 3 = 245 MB).
2. Build a small tokenizer: open_clip's ``SimpleTokenizer`` with a BPE merges file cut down to the merges the
   demo captions use (see ``build_demo_bpe``). Corpus words tokenize exactly as with open_clip's full 49k BPE,
   any other text still tokenizes (byte-level pieces), and the token table shrinks from 49,408 rows to a few
   hundred, which is most of the weight file of a model this small.
3. Build ``open_clip.model.CLIP(**model_cfg)`` from a seeded RNG and train it with ``open_clip.loss.ClipLoss``:
   AdamW, linear warmup then cosine decay, small random translations as the only augmentation (no flips, no
   colour jitter: captions name colours and sides).
4. Evaluate text->image and image->text recall@1/5/10 on the val split, at full depth and at every
   intermediate depth through the tower's own ``ln_post``/``proj`` (what an untrained exit would give).
5. Write ``clip_config.json`` ({"model_name", "model_cfg", "tokenizer"}), ``clip.safetensors`` (the full
   state_dict), the BPE file and ``card.json`` (config, seed, corpus, metrics, wall time, versions, the
   command that reproduces it) into the output directory.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline.demo import corpus as dc
from pipeline.io import storage
from pipeline.io.decode import DecodeConfig, decode_image
from pipeline.io.readers import expand_inputs, iter_samples
from pipeline.model.flops import count_gflops

log = logging.getLogger(__name__)

MODEL_NAME = "icar-demo"
CONFIG_FILE = "clip_config.json"
WEIGHTS_FILE = "clip.safetensors"
BPE_FILE = "bpe_demo_vocab.txt.gz"
CARD_FILE = "card.json"
RECALL_KS = (1, 5, 10)
# Words a user is likely to type that the captions may not contain: their merges are kept too, so they
# tokenize to whole words (their embeddings stay untrained unless the captions use them).
EXTRA_WORDS = ("a photo of an image showing the picture with and on in at of".split())


@dataclass
class DemoModelConfig:
    """The demo CLIP's shape (becomes the open_clip model cfg)."""

    image_size: int = 64  # input side in pixels
    # ViT patch side: (64 / 16)^2 = 16 patch tokens + 1 class token. Patch 8 (65 tokens) trains ~4x slower per
    # image on CPU (measured), too slow for the ~20 min budget; 16 already reaches val recall@10 = 1.0.
    patch_size: int = 16
    vision_width: int = 128  # vision transformer width
    vision_layers: int = 8  # blocks: exits such as 4 / 6 / 8 make sense
    vision_head_width: int = 32  # width per attention head (heads = width / head_width)
    vision_mlp_ratio: float = 4.0  # MLP hidden size / width in the vision blocks
    text_width: int = 96  # text transformer width
    text_layers: int = 2  # text blocks (the captions are short and templated)
    text_heads: int = 3  # text attention heads (32 wide each)
    context_length: int = 40  # text tokens incl. start/end; 99% of the demo captions fit
    embed_dim: int = 128  # joint embedding dimension

    def open_clip_cfg(self, vocab_size: int) -> dict:
        """Return the open_clip model cfg dict for this shape and a tokenizer of ``vocab_size`` tokens."""
        return {
            "embed_dim": self.embed_dim,
            "vision_cfg": {"image_size": self.image_size, "patch_size": self.patch_size,
                           "width": self.vision_width, "layers": self.vision_layers,
                           "head_width": self.vision_head_width, "mlp_ratio": self.vision_mlp_ratio},
            "text_cfg": {"context_length": self.context_length, "vocab_size": vocab_size,
                         "width": self.text_width, "heads": self.text_heads, "layers": self.text_layers},
        }


@dataclass
class DemoTrainConfig:
    """What `icar train-demo` does; see `icar train-demo --help`."""

    corpus: str  # demo corpus directory (from `icar make-demo-corpus`)
    output: str = "pipeline/assets/demo"  # where clip_config.json, clip.safetensors, the BPE file and card.json go
    model: DemoModelConfig = field(default_factory=DemoModelConfig)
    epochs: int = 3  # passes over the train split
    batch_size: int = 128  # images (and captions) per contrastive batch
    lr: float = 1e-3  # peak learning rate (AdamW)
    min_lr_ratio: float = 0.02  # the cosine schedule ends at lr * min_lr_ratio
    warmup_steps: int = 100  # linear warmup from 0 to lr
    weight_decay: float = 0.1  # AdamW weight decay on matrices only (not on biases, norms, embeddings, scale)
    grad_clip: float = 1.0  # max global gradient norm
    max_shift: int = 3  # augmentation: random translation of up to this many pixels (reflect-padded)
    # Caption augmentation: otherwise a shorter caption that is also true (scenes.parquet "partial_captions":
    # the objects alone, one group alone), so colour words bind to objects and short queries work.
    full_caption_prob: float = 1.0
    # Share of batches drawn from images with one background colour: the background then cannot tell the
    # images apart, so the loss pushes on shapes, counts and places (hard negatives, same ClipLoss).
    same_background_batches: float = 0.0
    # Epochs at the start with full captions and random batches only: from scratch, the model must first learn
    # the easy cues (colours, backgrounds); with hard batches from step 0, val recall@10 after one epoch was
    # 0.33 instead of 0.93 (measured on the 20k corpus).
    plain_epochs: int = 1
    seed: int = 0  # model init, batch order and augmentation
    eval_images: int = 1000  # val images for the recall evaluation (the first ones of the split)
    train_limit: int | None = None  # use only the first N train images (smoke runs); None: all
    # torch intra-op threads. 1 by default: on a shared 2-core box one thread trains ~4x faster than two
    # fighting other work for the cores (measured), and a fixed thread count keeps float sums reproducible.
    threads: int | None = 1
    progress: bool = True  # progress bar with the running loss


# ------------------------------------------------------------------------------------------------ tokenizer


def _bpe_path_merges(tok, word: str) -> list[tuple[str, str]]:
    """Return the merges open_clip's BPE applies to one pre-tokenized word, in the order it applies them."""
    parts = tuple(word[:-1]) + (word[-1] + "</w>",)
    used = []
    while len(parts) > 1:
        pairs = set(zip(parts, parts[1:]))
        best = min(pairs, key=lambda p: tok.bpe_ranks.get(p, math.inf))
        if best not in tok.bpe_ranks:
            break
        used.append(best)
        merged, i = [], 0
        while i < len(parts):
            if i < len(parts) - 1 and parts[i] == best[0] and parts[i + 1] == best[1]:
                merged.append(best[0] + best[1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = tuple(merged)
    return used


def build_demo_bpe(texts: list[str]) -> bytes:
    """Return a gzipped BPE merges file: open_clip's merges restricted to those ``texts`` use, in rank order.

    BPE merges the lowest-ranked pair present at each step; a merge that never fires on a word cannot change
    how that word is split, so dropping every merge the corpus never uses leaves the corpus's tokenization
    unchanged (checked in ``demo_tokenizer`` users' tests), while unseen words fall back to shorter pieces.
    """
    from open_clip.tokenizer import SimpleTokenizer

    full = SimpleTokenizer()
    words: set[str] = set()
    for text in list(texts) + list(EXTRA_WORDS):
        for token in full.pat.findall(full.clean_fn(text)):
            words.add("".join(full.byte_encoder[b] for b in token.encode("utf-8")))
    used: set[tuple[str, str]] = set()
    for word in words:
        used.update(_bpe_path_merges(full, word))
    kept = sorted(used, key=lambda p: full.bpe_ranks[p])
    body = "#version: 0.2 (icar demo: open_clip bpe_simple_vocab_16e6 restricted to the demo captions)\n"
    body += "\n".join(f"{a} {b}" for a, b in kept)  # no trailing newline: it would become an empty merge
    return gzip.compress(body.encode("utf-8"), mtime=0)


def demo_tokenizer(bpe_path: str | os.PathLike, context_length: int):
    """Return open_clip's SimpleTokenizer over the demo BPE file (what `load_clip("demo")` must use)."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(bpe_path=str(bpe_path), context_length=context_length)


# ------------------------------------------------------------------------------------------------ data


@dataclass
class SplitData:
    """One corpus split decoded into memory."""

    keys: list[str]
    captions: list[str]
    pixels: torch.Tensor  # uint8 (N, S, S, 3)


def load_split(corpus: str, split: str, image_size: int, limit: int | None = None,
               progress: bool = True) -> SplitData:
    """Return the first ``limit`` samples (all when None) of ``split``, decoded at ``image_size``."""
    from tqdm import tqdm

    doc = storage.read_json(storage.join(corpus, "corpus.json"))
    if split not in doc.get("splits", {}):
        raise ValueError(f"{corpus}/corpus.json has no split {split!r}: splits are {sorted(doc.get('splits', {}))}")
    info = doc["splits"][split]
    total = info["count"] if limit is None else min(limit, info["count"])
    shards = expand_inputs([storage.join(corpus, s) for s in info["shards"]])
    cfg = DecodeConfig(image_size=image_size)
    keys, captions = [], []
    pixels = np.empty((total, image_size, image_size, 3), dtype=np.uint8)
    bar = tqdm(total=total, desc=f"decode {split}", unit="img", disable=not progress)
    for shard in shards:
        for sample in iter_samples(shard):
            if len(keys) == total:
                break
            if sample.data is None:
                raise ValueError(f"demo corpus sample {sample.key} in {sample.source} is unreadable ({sample.error}): "
                                 "regenerate the corpus with `icar make-demo-corpus`")
            if not sample.caption:
                raise ValueError(f"demo corpus sample {sample.key} in {sample.source} has no caption")
            pixels[len(keys)] = decode_image(sample.data, cfg).pixels
            keys.append(sample.key)
            captions.append(sample.caption)
            bar.update(1)
    bar.close()
    if len(keys) < total:
        raise ValueError(f"{corpus}: split {split} holds {len(keys)} samples, corpus.json says {info['count']}")
    return SplitData(keys=keys, captions=captions, pixels=torch.from_numpy(pixels))


@dataclass
class CaptionPool:
    """Every caption a train image may be shown with: its full caption first, then shorter true ones."""

    tokens: torch.Tensor  # (T, context_length) token ids of every distinct text
    options: list[list[int]]  # per train image: indices into ``tokens``, the full caption first
    background: list[str]  # per train image: background colour name ("" when unknown)


def caption_pool(train: SplitData, scenes: dict[str, dict], tokenizer) -> CaptionPool:
    """Return the caption options of each train image (full caption only when scenes.parquet lacks partials)."""
    texts: dict[str, int] = {}
    options, background = [], []
    for key, caption in zip(train.keys, train.captions):
        row = scenes.get(key, {})
        choices = [caption] + list(row.get("partial_captions") or [])
        options.append([texts.setdefault(t, len(texts)) for t in choices])
        background.append(row.get("background_color") or "")
    return CaptionPool(tokens=tokenizer(list(texts)), options=options, background=background)


def read_scenes(corpus: str) -> dict[str, dict]:
    """Return scenes.parquet rows by key ({} when the corpus has no scenes table)."""
    url = storage.join(corpus, "scenes.parquet")
    if not storage.exists(url):
        return {}
    return {r["key"]: r for r in storage.read_parquet(url).to_pylist()}


def epoch_batches(pool: CaptionPool, batch_size: int, same_background: float,
                  gen: torch.Generator) -> list[torch.Tensor]:
    """Return one epoch's batches of train indices: a share of them from a single background colour, in random order.

    A random permutation is cut in two: the first part is stably sorted by background colour (so each colour's
    images stay in random order) and cut into batches that each hold one colour (two at a boundary), the rest
    is cut into ordinary random batches. The ragged tail is dropped, so every batch has ``batch_size`` images.
    """
    n = len(pool.options)
    steps = n // batch_size
    perm = torch.randperm(n, generator=gen)[:steps * batch_size]
    n_hard = round(same_background * steps) if any(pool.background) else 0
    if n_hard == 0:  # plain random batches, drawing nothing more from ``gen`` (older cards stay reproducible)
        return list(perm.view(steps, batch_size))
    hard = perm[:n_hard * batch_size].tolist()
    hard.sort(key=lambda i: pool.background[i])  # stable: keeps the random order inside a colour
    order = torch.cat([torch.tensor(hard, dtype=torch.long), perm[n_hard * batch_size:]])
    batches = list(order.view(steps, batch_size))
    shuffle = torch.randperm(steps, generator=gen).tolist()
    return [batches[i] for i in shuffle]


def pick_captions(pool: CaptionPool, idx: torch.Tensor, full_prob: float, gen: torch.Generator) -> torch.Tensor:
    """Return the token ids shown with images ``idx``: the full caption with probability ``full_prob``, else a shorter one."""
    if full_prob >= 1.0:  # draws nothing from ``gen``, like training before partial captions existed
        return pool.tokens[[pool.options[i][0] for i in idx.tolist()]]
    coins = torch.rand(len(idx), generator=gen).tolist()
    picks = torch.rand(len(idx), generator=gen).tolist()
    rows = []
    for i, coin, pick in zip(idx.tolist(), coins, picks):
        opts = pool.options[i]
        rows.append(opts[0] if coin < full_prob or len(opts) == 1 else opts[1 + int(pick * (len(opts) - 1))])
    return pool.tokens[rows]


def to_model_input(pixels_uint8: torch.Tensor, mean: tuple, std: tuple) -> torch.Tensor:
    """Return normalised float (N, 3, S, S) pixels from uint8 (N, S, S, 3), as the embedding actors do."""
    x = pixels_uint8.permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - m) / s


def random_shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Return ``x`` (N, C, S, S) with each image translated by up to ``max_shift`` pixels (reflect padding)."""
    if max_shift <= 0:
        return x
    n, _, s, _ = x.shape
    padded = torch.nn.functional.pad(x, (max_shift,) * 4, mode="reflect")
    offsets = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=gen).tolist()
    return torch.stack([padded[i, :, dy:dy + s, dx:dx + s] for i, (dy, dx) in enumerate(offsets)])


# ------------------------------------------------------------------------------------------------ model


def build_model(model_cfg: dict, seed: int):
    """Return ``open_clip.model.CLIP(**model_cfg)`` initialised from ``seed`` (caller's RNG untouched)."""
    import open_clip

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return open_clip.model.CLIP(**model_cfg)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        # Matrices decay; biases, norms, embeddings, class token and the logit scale do not (CLIP's recipe).
        if p.ndim < 2 or "embedding" in name or "logit_scale" in name or name.endswith("class_embedding"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, total: int, cfg: DemoTrainConfig) -> float:
    """Return the learning rate at ``step``: linear warmup, then cosine decay to lr * min_lr_ratio."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


@torch.no_grad()
def image_features_by_depth(model, x: torch.Tensor, depths: list[int]) -> dict[int, torch.Tensor]:
    """Return L2-normalised image embeddings after each depth in ``depths``, via the tower's own ln_post/proj.

    The last block's output equals ``model.encode_image`` (same ops in the same order).
    """
    v = model.visual
    h = v._embeds(x)
    out = {}
    for i, block in enumerate(v.transformer.resblocks, start=1):
        h = block(h)
        if i in depths:
            pooled, _ = v._pool(h)
            feats = pooled @ v.proj if v.proj is not None else pooled
            out[i] = torch.nn.functional.normalize(feats, dim=-1)
    return out


def recall_at_k(sim: torch.Tensor, ks=RECALL_KS) -> dict[str, float]:
    """Return text->image and image->text recall@k for a (texts x images) similarity with matches on the diagonal."""
    n = sim.shape[0]
    target = torch.arange(n)
    # Rank of the true match = how many candidates score strictly higher.
    t2i_rank = (sim > sim[target, target].unsqueeze(1)).sum(dim=1)
    i2t_rank = (sim.T > sim[target, target].unsqueeze(1)).sum(dim=1)
    out = {}
    for k in ks:
        out[f"t2i_r{k}"] = round(float((t2i_rank < k).float().mean()), 4)
        out[f"i2t_r{k}"] = round(float((i2t_rank < k).float().mean()), 4)
    return out


@torch.no_grad()
def evaluate(model, tokenizer, data: SplitData, mean, std, batch_size: int = 250) -> dict:
    """Return recall@1/5/10 both ways on ``data`` at every vision depth (full depth under "full")."""
    model.eval()
    depths = list(range(1, len(model.visual.transformer.resblocks) + 1))
    img = {d: [] for d in depths}
    txt = []
    for s in range(0, len(data.keys), batch_size):
        x = to_model_input(data.pixels[s:s + batch_size], mean, std)
        for d, f in image_features_by_depth(model, x, depths).items():
            img[d].append(f)
        txt.append(model.encode_text(tokenizer(data.captions[s:s + batch_size]), normalize=True))
    text = torch.cat(txt)
    by_depth = {str(d): recall_at_k(text @ torch.cat(img[d]).T) for d in depths}
    return {"images": len(data.keys), "full": by_depth[str(depths[-1])], "by_depth": by_depth}


@torch.no_grad()
def _quick_recall(model, tokenizer, data: SplitData, mean, std, batch_size: int = 250) -> dict:
    """Return full-depth recall@k on ``data`` (the learning curve in the card), leaving the model in train mode."""
    model.eval()
    img, txt = [], []
    for s in range(0, len(data.keys), batch_size):
        img.append(model.encode_image(to_model_input(data.pixels[s:s + batch_size], mean, std), normalize=True))
        txt.append(model.encode_text(tokenizer(data.captions[s:s + batch_size]), normalize=True))
    model.train()
    return recall_at_k(torch.cat(txt) @ torch.cat(img).T)


PROBE_ATTRIBUTES = ("shape", "color", "count", "size", "region", "background")


@torch.no_grad()
def attribute_probe(model, tokenizer, data: SplitData, corpus_seed: int, mean, std, split: str = "val",
                    seed: int = 0) -> dict[str, float]:
    """Return, per attribute, how often an image scores its true caption above the same caption with that attribute changed.

    For each image, one attribute of its first object group (shape, colour, count, size, place) or the
    background colour is swapped for another value; 0.5 is chance, 1.0 means the model always tells them apart.
    Scenes are regenerated from the corpus seed; a caption that does not match the stored one raises.
    """
    import copy

    model.eval()
    rng = np.random.default_rng(seed)
    img = torch.cat([model.encode_image(to_model_input(data.pixels[s:s + 250], mean, std), normalize=True)
                     for s in range(0, len(data.keys), 250)])
    values = {"shape": list(dc.SHAPES), "color": list(dc.COLORS), "count": [1, 2, 3, 4],
              "size": ["small", "medium"], "region": list(dc.REGIONS)}
    true_texts, false_texts, which, owner = [], [], [], []
    for i, caption in enumerate(data.captions):
        scene = dc.scene_of(corpus_seed, split, i)
        if dc.scene_caption(scene) != caption:
            raise ValueError(f"{split} image {i} ({data.keys[i]}): regenerated caption differs from the corpus; "
                             "the corpus was made with another seed or generator version")
        for attr in PROBE_ATTRIBUTES:
            alt = copy.deepcopy(scene)
            if attr == "background":
                used = {g.color for g in alt.groups} | {alt.background_color}
                options = [c for c in dc.COLORS if c not in used]
                alt.background_color = options[int(rng.integers(len(options)))]
            else:
                g = alt.groups[0]
                if attr == "region" and g.region is None or attr == "size" and g.size == "large":
                    continue
                options = [v for v in values[attr] if v != getattr(g, attr)]
                setattr(g, attr, options[int(rng.integers(len(options)))])
            text = dc.scene_caption(alt)
            if text != caption:
                true_texts.append(caption)
                false_texts.append(text)
                which.append(attr)
                owner.append(i)
    out = {}
    t_true = torch.cat([model.encode_text(tokenizer(true_texts[s:s + 500]), normalize=True)
                        for s in range(0, len(true_texts), 500)])
    t_false = torch.cat([model.encode_text(tokenizer(false_texts[s:s + 500]), normalize=True)
                         for s in range(0, len(false_texts), 500)])
    images = img[torch.tensor(owner)]
    wins = ((t_true * images).sum(1) > (t_false * images).sum(1)).numpy()
    for attr in PROBE_ATTRIBUTES:
        mask = np.array([w == attr for w in which])
        out[attr] = round(float(wins[mask].mean()), 4) if mask.any() else None
    return out


# ------------------------------------------------------------------------------------------------ training


def per_image_gflops(model, tokenizer, m: DemoModelConfig) -> dict:
    """Return counted GFLOPs of one image through the image tower and one caption through the text tower."""
    model.eval()
    x = torch.zeros(1, 3, m.image_size, m.image_size)
    text = tokenizer(["two red circles and a blue square on a striped green background"])
    return {"image_tower": round(count_gflops(model.visual, x), 5),
            "text_tower": round(count_gflops(lambda t: model.encode_text(t), text), 5)}


def _versions() -> dict:
    import open_clip
    import PIL

    return {"python": platform.python_version(), "torch": torch.__version__, "open_clip": open_clip.__version__,
            "numpy": np.__version__, "pillow": PIL.__version__, "platform": platform.platform()}


def _reproduce_command(cfg: DemoTrainConfig, corpus_doc: dict) -> str:
    d = DemoTrainConfig(corpus="")
    flags = [f"--corpus {cfg.corpus}", f"--output {cfg.output}", f"--epochs {cfg.epochs}", f"--seed {cfg.seed}"]
    for name in ("batch_size", "lr", "warmup_steps", "weight_decay", "eval_images", "train_limit", "threads",
                 "full_caption_prob", "same_background_batches", "plain_epochs"):
        if getattr(cfg, name) != getattr(d, name):
            flags.append(f"--{name.replace('_', '-')} {getattr(cfg, name)}")
    if cfg.model != d.model:
        flags.append(f"--model-json '{json.dumps(asdict(cfg.model), sort_keys=True)}'")
    corpus_cmd = corpus_doc.get("command", "icar make-demo-corpus ...")
    return f"{corpus_cmd} && icar train-demo {' '.join(flags)}"


def train_demo(cfg: DemoTrainConfig) -> dict:
    """Train the demo CLIP on ``cfg.corpus``, write it under ``cfg.output``; return the card (metrics included)."""
    import open_clip
    from open_clip.loss import ClipLoss
    from safetensors.torch import save as safetensors_save
    from tqdm import tqdm

    started = time.time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    corpus_doc = storage.read_json(storage.join(cfg.corpus, "corpus.json"))
    m = cfg.model
    train = load_split(cfg.corpus, "train", m.image_size, cfg.train_limit, cfg.progress)
    val = load_split(cfg.corpus, "val", m.image_size, cfg.eval_images, cfg.progress)
    if len(train.keys) < cfg.batch_size:
        raise ValueError(f"train split has {len(train.keys)} images, fewer than --batch-size {cfg.batch_size}: "
                         "lower --batch-size or make a larger corpus")
    decoded_s = time.time() - started

    bpe = build_demo_bpe(train.captions)
    out_dir = cfg.output.rstrip("/")
    storage.atomic_write_bytes(storage.join(out_dir, BPE_FILE), bpe)
    tok_path = _local_copy(bpe)
    tokenizer = demo_tokenizer(tok_path, m.context_length)
    model_cfg = m.open_clip_cfg(tokenizer.vocab_size)
    model = build_model(model_cfg, cfg.seed)
    mean, std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
    n_params = sum(p.numel() for p in model.parameters())
    log.info("demo CLIP: %.2fM parameters, vocab %d, %d train / %d val images (decoded in %.0f s)",
             n_params / 1e6, tokenizer.vocab_size, len(train.keys), len(val.keys), decoded_s)

    pool = caption_pool(train, read_scenes(cfg.corpus), tokenizer)
    if not any(len(o) > 1 for o in pool.options):
        log.info("no partial captions in %s/scenes.parquet: training on full captions only", cfg.corpus)
    truncated = sum(len(tokenizer.encode(c)) + 2 > m.context_length for c in train.captions)
    loss_fn = ClipLoss()
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    gen = torch.Generator().manual_seed(cfg.seed)
    steps_per_epoch = len(train.keys) // cfg.batch_size  # drop the ragged last batch: constant batch statistics
    total = steps_per_epoch * cfg.epochs
    history = []
    step = 0
    train_started = time.time()
    for epoch in range(cfg.epochs):
        model.train()
        plain = epoch < cfg.plain_epochs
        full_prob = 1.0 if plain else cfg.full_caption_prob
        batches = epoch_batches(pool, cfg.batch_size, 0.0 if plain else cfg.same_background_batches, gen)
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not cfg.progress)
        running = 0.0
        for b, idx in enumerate(bar):
            x = random_shift(to_model_input(train.pixels[idx], mean, std), cfg.max_shift, gen)
            text = pick_captions(pool, idx, full_prob, gen)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, cfg)
            img_f, txt_f, scale = model(x, text)
            loss = loss_fn(img_f, txt_f, scale)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            step += 1
            running = loss.item() if b == 0 else 0.9 * running + 0.1 * loss.item()
            bar.set_postfix(loss=f"{running:.3f}", lr=f"{lr_at(step - 1, total, cfg):.2e}")
        bar.close()
        entry = {"epoch": epoch + 1, "loss": round(running, 4), "seconds": round(time.time() - train_started, 1)}
        if epoch + 1 < cfg.epochs:  # the last epoch gets the full evaluation below
            entry["val_full_depth"] = _quick_recall(model, tokenizer, val, mean, std)
        history.append(entry)
        log.info("epoch %d/%d: %s", epoch + 1, cfg.epochs, entry)
    train_s = time.time() - train_started

    metrics = evaluate(model, tokenizer, val, mean, std)
    log.info("val recall (%d images, full depth): %s", metrics["images"], metrics["full"])
    metrics["attribute_probe"] = attribute_probe(model, tokenizer, val, int(corpus_doc["seed"]), mean, std)
    log.info("attribute probe (true caption preferred over one attribute changed; 0.5 = chance): %s",
             metrics["attribute_probe"])
    gflops = per_image_gflops(model, tokenizer, m)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    weights = safetensors_save(state)
    config_doc = {
        "model_name": MODEL_NAME,
        "model_cfg": model_cfg,
        "tokenizer": {"class": "open_clip.tokenizer.SimpleTokenizer", "bpe_path": BPE_FILE,
                      "context_length": m.context_length,
                      "note": "bpe_path is relative to this file's directory: open_clip's BPE cut down to the "
                              "merges the demo captions use (see pipeline/demo/training.py)"},
        "preprocess_cfg": {"size": m.image_size, "mean": list(mean), "std": list(std),
                           "interpolation": "bicubic", "resize_mode": "shortest"},
    }
    card = {
        "model_name": MODEL_NAME,
        "what": "a small open_clip CLIP trained from scratch on the synthetic demo corpus; a testbed for ICAR, "
                "not a general-purpose model (it knows shapes, colours, counts, places and backgrounds)",
        "model_cfg": model_cfg,
        "parameters": n_params,
        "vocab_size": tokenizer.vocab_size,
        "train": {**{k: v for k, v in asdict(cfg).items() if k not in ("model", "progress")},
                  "model": asdict(m), "train_images": len(train.keys), "steps": total,
                  "steps_per_epoch": steps_per_epoch, "captions_truncated": truncated,
                  "loss": "open_clip.loss.ClipLoss", "optimizer": "AdamW(betas=(0.9, 0.98), eps=1e-6)",
                  "augmentation": f"random translation up to {cfg.max_shift} px (reflect); no flips, no colour jitter",
                  "history": history},
        "corpus": {k: corpus_doc.get(k) for k in ("command", "corpus_version", "seed", "image_size", "jpeg_quality",
                                                   "shard_size")} | {
            "splits": {k: v["count"] for k, v in corpus_doc.get("splits", {}).items()}},
        "metrics": {"val": metrics},
        "gflops_per_image": gflops,
        "wall_seconds": {"total": round(time.time() - started, 1), "decode": round(decoded_s, 1),
                         "train": round(train_s, 1)},
        "threads": torch.get_num_threads(),
        "versions": _versions(),
        "files": {WEIGHTS_FILE: {"bytes": len(weights)}, BPE_FILE: {"bytes": len(bpe)}},
        "reproduce": _reproduce_command(cfg, corpus_doc),
    }
    storage.atomic_write_bytes(storage.join(out_dir, WEIGHTS_FILE), weights)
    storage.write_json(config_doc, storage.join(out_dir, CONFIG_FILE))
    storage.write_json(card, storage.join(out_dir, CARD_FILE))
    os.remove(tok_path)
    return card


def _local_copy(data: bytes) -> str:
    """Return the path of a temporary local file holding ``data`` (SimpleTokenizer reads a path)."""
    import tempfile

    fd, path = tempfile.mkstemp(suffix=".txt.gz", prefix="icar-demo-bpe-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def load_trained(directory: str | os.PathLike):
    """Return (model in eval mode, tokenizer, config document) from a directory ``train_demo`` wrote."""
    from safetensors.torch import load_file

    d = Path(directory)
    doc = json.loads((d / CONFIG_FILE).read_text())
    model = build_model(doc["model_cfg"], seed=0)
    model.load_state_dict(load_file(str(d / WEIGHTS_FILE)))
    model.eval()
    tok = demo_tokenizer(d / doc["tokenizer"]["bpe_path"], doc["tokenizer"]["context_length"])
    return model, tok, doc

