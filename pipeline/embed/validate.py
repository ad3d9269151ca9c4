"""Checks of command-line values that need no cluster and no model, run by the driver before Ray starts.

A bad value found by a model actor costs the user Ray's and the model's start-up (20-70 s) and ends in a
traceback; found here, it costs a few milliseconds and one line that names the option, the value and the fix.
Each check raises ``ArgumentProblem`` with that line. The model actors still check everything again on the
loaded objects: these checks only move the common failures earlier, and let through what they cannot judge
(a router or checkpoint behind a URL).

Nothing here imports torch or open_clip (the embed driver never does: see tests/faults/test_memory.py). open_clip's
model names and tower depths come from its ``model_configs/*.json``, its pretrained tags from its
``pretrained.py`` read as source, and cached weights from the Hugging Face cache layout.
"""

from __future__ import annotations

import ast
import copy
import difflib
import fnmatch
import functools
import hashlib
import importlib.util
import json
import logging
import os
import socket
import typing
import urllib.parse
import warnings
from pathlib import Path

from pipeline.embed.config import EmbedConfig
from pipeline.io.storage import safetensors_metadata
from pipeline.model.spec import ModelSpec, confidence_heads_file
from pipeline.model.scorer_identity import DEFAULT_CHECKPOINT, expected_identity, router_scorer_mismatch

log = logging.getLogger(__name__)

DEMO_DIR = Path(__file__).parent.parent / "assets" / "demo"  # pipeline.model.models.DEMO_DIR, which imports torch
MODEL_DIR_CONFIG = "clip_config.json"  # what makes a directory a model directory (pipeline.model.models)
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
RANDOM_INIT = ("none", "random", "")
MAX_K = 100_000  # `icar search -k` above this is refused: a table of more rows is no answer for people
GLOB_CHARS = "*?[{"


class ArgumentProblem(ValueError):
    """A command-line value that cannot work; the message is one line naming the option, the value and the fix."""


# ------------------------------------------------------------------------------------------------ models


@functools.lru_cache(maxsize=1)
def _open_clip_dir() -> Path | None:
    """Return the installed open_clip package's folder, found without importing it (None if not installed)."""
    spec = importlib.util.find_spec("open_clip")
    return Path(spec.origin).parent if spec is not None and spec.origin else None


@functools.lru_cache(maxsize=1)
def open_clip_model_names() -> tuple[str, ...]:
    """Return the model names open_clip knows (its model_configs/*.json), sorted; () when that cannot be read."""
    root = _open_clip_dir()
    configs = root / "model_configs" if root else None
    if configs is None or not configs.is_dir():
        return ()
    return tuple(sorted(p.stem for p in configs.glob("*.json")))


def is_model_dir(path: str | None) -> bool:
    """Return True when ``path`` is a local directory holding a clip_config.json (a model directory)."""
    return bool(path) and os.path.isdir(path) and (Path(path) / MODEL_DIR_CONFIG).is_file()


def model_config(model: str, pretrained: str | None = None) -> dict:
    """Return the open_clip model cfg that ``--model model [--pretrained ...]`` builds ({} when it cannot be read
    here); raise ArgumentProblem for a model name open_clip does not know."""
    for directory in ((DEMO_DIR if model == "demo" else None), model, pretrained):
        if directory is not None and is_model_dir(str(directory)):
            return json.loads((Path(directory) / MODEL_DIR_CONFIG).read_text()).get("model_cfg", {})
    names = open_clip_model_names()
    if not names or model in names:
        return json.loads((_open_clip_dir() / "model_configs" / f"{model}.json").read_text()) if names else {}
    close = difflib.get_close_matches(model, names, n=3)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    raise ArgumentProblem(f"--model {model}: open_clip has no such model; {hint}give an open_clip name such as "
                          f"ViT-B-32 (open_clip.list_models() lists them), 'demo', or a model directory")


def tower_depth(cfg: dict) -> int | None:
    """Return the number of transformer blocks of a cfg's image tower, or None (ResNet and timm towers)."""
    layers = (cfg.get("vision_cfg") or {}).get("layers")
    return layers if isinstance(layers, int) and not isinstance(layers, bool) else None


def heads_exits(spec: ModelSpec) -> tuple[str, list[int]] | None:
    """Return (where, exits) of the exit heads a run would load (--heads, else the demo's shipped heads), read from
    the file's metadata without torch; None when no heads apply or they cannot be read here (the actors judge)."""
    path = spec.heads
    if path is None and spec.model == "demo" and (DEMO_DIR / "exit_heads.safetensors").exists():
        path = str(DEMO_DIR / "exit_heads.safetensors")
    if path is None or "://" in path or not os.path.isfile(path):
        return None
    try:
        exits = json.loads(safetensors_metadata(Path(path).read_bytes())["exits"])
        exits = [int(e) for e in exits]
    except (ValueError, KeyError, OSError, TypeError):
        return None  # not a heads file: the actors say so with the full reason
    where = f"the exit heads {path}" if spec.heads else "the demo's shipped exit heads"
    return where, exits


def default_exits(depth: int) -> list[int]:
    """Return the exits a tower of ``depth`` blocks gets when none are given (as pipeline.model.encoder's
    default_exits, which imports torch): half, three quarters, all."""
    return sorted({max(1, round(depth / 2)), max(1, round(3 * depth / 4)), depth})


def check_exit_at(spec: ModelSpec, depth: int | None) -> str | None:
    """Refuse an --exit-at that the exit heads were not trained for; return a warning (else None) when it adds an
    exit of its own, whose head is then the tower's own ln_post/proj, which no training has seen."""
    if spec.exit_at is None or depth is None or spec.exit_at == depth or spec.exits:
        return None  # full depth needs no head; with --exits, check_exits has judged the list
    trained = heads_exits(spec)
    if trained is not None:
        where, exits = trained
        if spec.exit_at not in exits:
            early = [e for e in exits if e != depth]
            raise ArgumentProblem(
                f"--exit-at {spec.exit_at}: {where} were trained for exits {', '.join(map(str, early))} (and full "
                f"depth {depth}), not {spec.exit_at}; pick one of those, or train heads for it with `icar "
                f"train-exits --exits {','.join(map(str, sorted(set(early) | {spec.exit_at})))},{depth}`")
        return None
    defaults = default_exits(depth)
    if spec.exit_at in defaults:
        return None
    return (f"--exit-at {spec.exit_at} is not one of the default exits {', '.join(map(str, defaults))} of "
            f"{spec.model}: exit {spec.exit_at} is added, with the tower's own ln_post/proj as its head (no --heads "
            f"given, so no head was trained for it)")


def random_weights(spec: ModelSpec) -> bool:
    """Return True when ``spec`` embeds with a seeded random init (an open_clip name with no --pretrained, or
    --pretrained none): embeddings that carry no meaning. The demo and model directories carry their own weights."""
    if spec.model == "demo" or is_model_dir(spec.model) or is_model_dir(spec.pretrained):
        return False
    return spec.pretrained is None or spec.pretrained.lower() in RANDOM_INIT


def spec_files(spec: ModelSpec) -> dict[str, list[int]] | None:
    """Return {path: [size, mtime_ns]} of the local files ``spec`` loads weights, heads, a router or a scorer from
    (the demo's and the shipped scorer's included); None when one of them is behind a URL (not checked cheaply).

    A resume with nothing to embed compares these with run.json's instead of loading the model: a checkpoint
    replaced in place under the same path changes them, and the model is then loaded and checked after all.
    """
    paths = [spec.pretrained, spec.heads, spec.router, spec.scorer_checkpoint]
    for directory in (spec.model, spec.pretrained):
        if directory and is_model_dir(directory):
            paths += [str(Path(directory) / MODEL_DIR_CONFIG), str(Path(directory) / "clip.safetensors")]
    if spec.model == "demo":
        paths += [str(DEMO_DIR / name) for name in (MODEL_DIR_CONFIG, "clip.safetensors", "exit_heads.safetensors",
                                                     "router.json", "scorer.json")]
    if spec.scorer == "default" and not spec.scorer_checkpoint:
        paths.append(str(DEFAULT_CHECKPOINT))
    paths.append(_confidence_heads(spec.router))
    out: dict[str, list[int]] = {}
    for path in paths:
        if not path or path.lower() in RANDOM_INIT:
            continue
        if "://" in path:
            return None
        if os.path.isfile(path):
            st = os.stat(path)
            out[os.path.abspath(path)] = [int(st.st_size), int(st.st_mtime_ns)]
    return out


def _confidence_heads(router_file: str | None) -> str | None:
    """Return the confidence-heads file a local confidence router JSON names (as the worker resolves it), else None.

    The router JSON records only the heads' path and hash: heads retrained in place under the same path leave the
    router file untouched, so spec_files must look at the heads file itself."""
    if not router_file or "://" in router_file or not os.path.isfile(router_file):
        return None
    try:
        with open(router_file, encoding="utf-8") as f:
            router = json.load(f)
    except (OSError, ValueError):
        return None  # not for this check to judge: loading the router reports it
    if not isinstance(router, dict) or router.get("kind") != "confidence":
        return None
    recorded = (router.get("confidence") or {}).get("path")
    if not isinstance(recorded, str):
        return None
    return confidence_heads_file(recorded, router_file)


def routes_by_score(router: dict | None) -> bool:
    """Return True when a router (run.json's or a router JSON's dict) routes images by their complexity score:
    thresholds, several profiles, or confidence exits with a complexity block. Fixed depths, fixed fractions, one
    profile and confidence exits alone do not."""
    router = router or {}
    kind = router.get("kind")
    return (kind == "threshold" or (kind == "profile" and len(router.get("profiles") or []) > 1)
            or (kind == "confidence" and bool(router.get("complexity"))))


def check_exits(spec: ModelSpec, depth: int | None) -> None:
    """Refuse --exits and --exit-at depths that the model's image tower does not have."""
    if depth is None:
        return
    if spec.exits:
        exits = list(spec.exits)
        if exits != sorted(set(exits)) or exits[0] < 1 or exits[-1] != depth:
            raise ArgumentProblem(
                f"--exits {','.join(map(str, exits))}: exits are block counts of the {depth}-block image tower of "
                f"{spec.model}, ascending, distinct, in 1..{depth} and ending at the full depth {depth}; "
                f"e.g. --exits {depth // 2},{depth}")
    if spec.exit_at is not None and not 1 <= spec.exit_at <= depth:
        raise ArgumentProblem(f"--exit-at {spec.exit_at}: the image tower of {spec.model} has {depth} blocks; "
                              f"give a depth in 1..{depth}, e.g. --exit-at {max(1, depth // 2)}")


# ------------------------------------------------------------------------------------------- pretrained


@functools.lru_cache(maxsize=1)
def open_clip_pretrained() -> dict | None:
    """Return open_clip's table of pretrained weights ({model: {tag: cfg with url / hf_hub}}), or None.

    Read from its pretrained.py run as source with its imports left out: importing open_clip imports torch.
    None when this open_clip lays it out otherwise; the model actors then report a bad tag as before.
    """
    root = _open_clip_dir()
    try:
        tree = ast.parse((root / "pretrained.py").read_text())
        tree.body = [n for n in tree.body if not isinstance(n, (ast.Import, ast.ImportFrom, ast.Try))]
        names: dict = {n: getattr(typing, n) for n in dir(typing) if not n.startswith("_")}
        exec(compile((root / "constants.py").read_text(), str(root / "constants.py"), "exec"), names)
        names.update(copy=copy, hashlib=hashlib, os=os, urllib=urllib, warnings=warnings,
                     partial=functools.partial, tqdm=None, __version__="", hf_hub_download=None,
                     _has_hf_hub=False, _has_safetensors=False)
        exec(compile(tree, str(root / "pretrained.py"), "exec"), names)
        table = names["_PRETRAINED"]
    except Exception as e:  # a layout this reader does not know: leave the check to the actors
        log.debug("cannot read open_clip's pretrained table without importing it: %s: %s", type(e).__name__, e)
        return None
    return table if isinstance(table, dict) else None


def hf_hub_cache() -> str:
    """Return the Hugging Face hub cache folder, as huggingface_hub resolves it from the environment."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


def cached_weights(cfg: dict) -> str | None:
    """Return the local file of one pretrained cfg's weights if open_clip already downloaded them, else None.

    open_clip fetches an ``hf_hub`` entry ("org/repo/" or "org/repo/file") with huggingface_hub, a .safetensors
    twin first, and a ``url`` entry into ~/.cache/clip.
    """
    hub = cfg.get("hf_hub")
    if hub:
        try:  # lazy: an optional dependency (open_clip's, for hf-hub models); the check works without it
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            try_to_load_from_cache = None
        if try_to_load_from_cache is not None:
            repo, filename = os.path.split(hub)  # "org/repo/" names open_clip's default file
            filename = filename or "open_clip_pytorch_model.bin"
            twins = (["open_clip_model.safetensors"] if filename == "open_clip_pytorch_model.bin" else
                     [filename[:-4] + ".safetensors"] if filename.endswith((".bin", ".pth")) else [])
            for name in [*twins, filename]:
                found = try_to_load_from_cache(repo, name, cache_dir=hf_hub_cache())
                if isinstance(found, str):
                    return found
    url = cfg.get("url")
    if url:
        path = os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(url))
        if os.path.isfile(path):
            return path
    return None


def _reachable(url: str, timeout_s: float = 3.0) -> bool:
    """Return True when a TCP connection to ``url``'s host opens within ``timeout_s`` (or a proxy is set, which
    this probe cannot go through: the download then decides)."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    parts = urllib.parse.urlsplit(url)
    try:
        socket.create_connection((parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)),
                                 timeout=timeout_s).close()
    except OSError:
        return False
    return True


def check_pretrained(model: str, pretrained: str | None) -> None:
    """Refuse a --pretrained that is neither 'none', a checkpoint file, nor a tag of ``model`` whose weights are
    cached here or can be downloaded now."""
    if model == "demo":
        if pretrained not in (None, "none", "shipped"):
            raise ArgumentProblem(f"--pretrained {pretrained}: the demo model carries its own weights; leave "
                                  f"--pretrained out, or pick an open_clip --model for open_clip weights")
        return
    if pretrained is None or pretrained.lower() in RANDOM_INIT or is_model_dir(model) or is_model_dir(pretrained):
        return
    if pretrained.lower().endswith(CHECKPOINT_SUFFIXES) or "://" in pretrained or os.path.exists(pretrained):
        if "://" not in pretrained and not os.path.isfile(pretrained):
            raise ArgumentProblem(f"--pretrained {pretrained}: no such checkpoint file; give the path of a "
                                  f".safetensors/.pt file, an open_clip tag of {model}, or none")
        return
    table = open_clip_pretrained()
    if table is None:
        return
    tags = list(table.get(model, {}))
    if pretrained not in tags:
        raise ArgumentProblem(f"--pretrained {pretrained}: not a checkpoint file nor an open_clip tag of {model} "
                              f"(its tags: {', '.join(tags) or 'none; pass --pretrained none or a file'}); "
                              f"pass one of them, a .safetensors/.pt path, or none")
    cfg = table[model][pretrained]
    if cached_weights(cfg):
        return
    source = (os.environ.get("HF_ENDPOINT") or "https://huggingface.co") if cfg.get("hf_hub") else cfg.get("url", "")
    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    if offline or not source or not _reachable(source):
        why = "HF_HUB_OFFLINE is set" if offline else f"{urllib.parse.urlsplit(source).hostname} cannot be reached"
        raise ArgumentProblem(
            f"--pretrained {pretrained}: the {model} weights are not in the cache ({hf_hub_cache()}) and {why}; "
            f"download them once where there is internet (open_clip.create_model('{model}', "
            f"pretrained='{pretrained}')) and copy that cache here, or pass the weights file as --pretrained FILE")


# ----------------------------------------------------------------------------------------- routing, heads


def _routing_options(spec: ModelSpec) -> list[str]:
    """Return the routing options ``spec`` sets (at most one may be set)."""
    return [name for name, on in (("--full-depth", spec.full_depth), ("--exit-at", spec.exit_at is not None),
                                  ("--route-fractions", spec.route_fractions is not None),
                                  ("--router", spec.router is not None)) if on]


def check_scorer_and_router(spec: ModelSpec, depth: int | None) -> None:
    """Refuse a scorer without its checkpoint, several routing options, and a router that the run cannot follow:
    unreadable, routing to exits beyond the tower, or calibrated for another scorer than the run's."""
    if spec.scorer == "convnext" and not spec.scorer_checkpoint:
        raise ArgumentProblem("--scorer convnext: needs --checkpoint FILE.safetensors (from `icar train-complexity`)"
                              "; or use --scorer default")
    if spec.scorer_checkpoint and spec.scorer in ("heuristic", "none"):
        raise ArgumentProblem(f"--checkpoint {spec.scorer_checkpoint}: --scorer {spec.scorer} takes no checkpoint; "
                              f"use --scorer convnext with it, or leave --checkpoint out")
    if spec.scorer_checkpoint and "://" not in spec.scorer_checkpoint and not os.path.isfile(spec.scorer_checkpoint):
        raise ArgumentProblem(f"--checkpoint {spec.scorer_checkpoint}: no such file; give a ConvNeXt-IC checkpoint "
                              f"from `icar train-complexity`, or leave it out for the shipped scorer")
    if spec.heads and "://" not in spec.heads and not os.path.isfile(spec.heads):
        raise ArgumentProblem(f"--heads {spec.heads}: no such file; give exit heads from `icar train-exits`, or leave "
                              f"--heads out for the tower's own ln_post/proj")
    chosen = _routing_options(spec)
    if len(chosen) > 1:
        raise ArgumentProblem(f"{' and '.join(chosen)}: choose one routing option")
    path, where = spec.router, spec.router
    # --merge routes every image to one profile itself: the demo's shipped router is not used then.
    if path is None and not chosen and spec.merge is None and spec.model == "demo" and (DEMO_DIR / "router.json").exists():
        path, where = str(DEMO_DIR / "router.json"), "the demo's shipped router (pipeline/assets/demo/router.json)"
    if path is None or "://" in path:
        return  # no router, or one behind a URL: the actors read and check it
    if not os.path.isfile(path):
        raise ArgumentProblem(f"--router {path}: no such file; write one with `icar calibrate ... --output {path}`")
    try:
        doc = json.loads(Path(path).read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise ArgumentProblem(f"--router {path}: not a router JSON ({type(e).__name__}); give a file written by "
                              f"`icar calibrate`") from None
    if not isinstance(doc, dict):
        raise ArgumentProblem(f"--router {path}: not a router JSON (a {type(doc).__name__}, not an object); give a "
                              f"file written by `icar calibrate`")
    exits = doc.get("exits")
    if depth is not None and isinstance(exits, list) and exits and max(exits) > depth:
        raise ArgumentProblem(f"--router {path}: routes to exits {exits}, beyond the {depth} blocks of {spec.model}'s "
                              f"tower; calibrate a router for this model with `icar calibrate ... --model {spec.model}`")
    if doc.get("kind") == "confidence":
        check_confidence_router(path, doc)
    if not routes_by_score(doc):
        return
    if spec.scorer == "none":
        raise ArgumentProblem(f"--scorer none: {where} routes by complexity score; choose a scorer (--scorer default) "
                              f"or route without one (--full-depth, --exit-at N)")
    recorded = doc.get("scorer")
    identity = expected_identity(spec.model, spec.scorer, spec.scorer_checkpoint) if recorded else None
    problem = router_scorer_mismatch(where, recorded, identity, spec.model, spec.scorer) if identity else None
    if problem:
        raise ArgumentProblem(problem)


def check_confidence_router(path: str, doc: dict) -> None:
    """Refuse a confidence router whose heads file is missing, is no confidence-heads file, or holds other heads
    than the ones its thresholds were fitted for (read from the file's safetensors header, no torch)."""
    recorded = (doc.get("confidence") or {}).get("path")
    if not recorded:
        raise ArgumentProblem(f"--router {path}: a confidence router must name its confidence-heads file; write it "
                              f"with `icar calibrate --confidence-heads FILE`")
    heads = confidence_heads_file(recorded, path)
    if "://" in heads:
        return  # the actors read and check it
    if not os.path.isfile(heads):
        raise ArgumentProblem(f"--router {path}: its confidence heads {recorded} do not exist (nor beside the router); "
                              f"put them back or recalibrate with `icar calibrate --confidence-heads FILE`")
    try:
        meta = safetensors_metadata(Path(heads).read_bytes())
    except ValueError:
        meta = {}
    if meta.get("format") != "icar-confidence-heads":
        raise ArgumentProblem(f"--router {path}: {heads} is not a confidence-heads file from `icar train-confidence`")
    want = (doc.get("confidence") or {}).get("sha256")
    if want and meta.get("sha256") != want:
        raise ArgumentProblem(f"--router {path}: its thresholds were fitted for confidence heads {want[:16]}…, but "
                              f"{heads} holds {str(meta.get('sha256'))[:16]}…; recalibrate with `icar calibrate "
                              f"--confidence-heads {heads}`")


# -------------------------------------------------------------------------------------------------- output


def _is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def _local_path(url: str) -> str:
    """Return the absolute, link-free path of a local path or file:// URL."""
    return os.path.realpath(os.path.expanduser(url[len("file://"):] if url.startswith("file://") else url))


def _split_glob(url: str) -> tuple[str, str]:
    """Return (the folder before the first wildcard component, the rest) of a glob; (url, "") for no glob."""
    parts = url.split("/")
    for i, part in enumerate(parts):
        if any(c in part for c in GLOB_CHARS):
            return "/".join(parts[:i]) or "/", "/".join(parts[i:])
    return url, ""


def _inside(child: str, parent: str) -> bool:
    parent = parent.rstrip("/") or "/"
    return child == parent or child.startswith(parent if parent.endswith("/") else parent + "/")


def output_inside_input(output: str, inputs: list[str]) -> str | None:
    """Return the input whose listing would take in files of the run directory ``output``, or None.

    A folder input reads everything below it; a glob reads what it matches (a folder it matches, whole), so an
    output inside either would be read back as input by every later run.
    """
    local = _is_local(output)
    out = _local_path(output) if local else output.rstrip("/")
    written = [out] + [f"{out}/{name}" for name in ("shards/part-00000.parquet", "errors/part-00000.parquet",
                                                    "manifest.parquet", "run.json")]
    for url in inputs:
        if _is_local(url) != local:
            continue
        root, rest = _split_glob(url)
        root = _local_path(root) if local else root.rstrip("/")
        if not _inside(out, root):
            continue
        if not rest:
            if not local or os.path.isdir(root):
                return url
            continue
        pattern = f"{root.rstrip('/')}/{rest}"
        # fnmatch's * also crosses "/": a folder a glob matches is read whole, so a match of any ancestor counts.
        if any(fnmatch.fnmatchcase(p, pattern) for p in written):
            return url
    return None


def check_output(output: str, inputs: list[str]) -> None:
    """Refuse an empty --output, one that is a file or lies where nothing can be written, and one inside an input."""
    if not output.strip():
        raise ArgumentProblem("--output '': empty; name the run directory, e.g. --output runs/demo")
    inside = output_inside_input(output, inputs)
    if inside is not None:
        raise ArgumentProblem(f"--output {output}: inside the input {inside}, so every later run would read its own "
                              f"shards as input; write the run directory outside the inputs")
    if not _is_local(output):
        return  # object stores: storage.check_writable probes them with a real write
    path = _local_path(output)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ArgumentProblem(f"--output {output}: is a file, not a directory; name a new or existing directory for "
                              f"the run")
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ArgumentProblem(f"--output {output}: {existing} is a file, so no directory can be made under it; name "
                              f"another place for the run")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ArgumentProblem(f"--output {output}: {existing} is read-only for this user; name a writable place for "
                              f"the run")


# ------------------------------------------------------------------------------------------------- jobs


def cuda_device_count() -> int:
    """Return how many CUDA devices the driver library shows this process (0 without one), without importing torch.

    Asks libcuda itself (cuInit, cuDeviceGetCount), which honours CUDA_VISIBLE_DEVICES as torch does.
    """
    import ctypes  # only here: the one check that talks to a shared library

    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return int(count.value)


def check_decode_device(cfg: EmbedConfig) -> None:
    """Refuse ``--decode-device cuda`` where the model actors get no GPU: a CPU model, or no CUDA device on a
    machine whose embedded Ray runs them. (On a cluster, --address, the actors' device is checked once they start.)"""
    if cfg.decode_device not in ("cpu", "cuda"):
        raise ArgumentProblem(f"--decode-device {cfg.decode_device}: use cpu (decode in the shard tasks) or cuda "
                              f"(decode JPEGs on the model actor's GPU)")
    if cfg.decode_device == "cpu":
        return
    if cfg.spec.device == "cpu":
        raise ArgumentProblem("--decode-device cuda decodes JPEGs on the model's GPU, but --device cpu puts the model "
                              "on the CPU; drop --decode-device (the default decodes on CPU) or use --device cuda")
    if cfg.resolved_address() is None and cuda_device_count() == 0:
        raise ArgumentProblem("--decode-device cuda: this machine has no CUDA device (libcuda finds none), so the "
                              "model actors run on CPU; drop --decode-device (the default decodes on CPU) or run on a "
                              "GPU machine")


def check_embed(cfg: EmbedConfig) -> list[str]:
    """Refuse, before Ray starts, every `icar embed` value that is known to fail later; raise ArgumentProblem.

    Return warnings for values that work but surprise (the driver logs them on its first lines).
    """
    check_output(cfg.output, list(cfg.inputs))
    check_decode_device(cfg)
    spec = cfg.spec
    model_cfg = model_config(spec.model, spec.pretrained)
    check_pretrained(spec.model, spec.pretrained)
    depth = tower_depth(model_cfg)
    check_exits(spec, depth)
    check_scorer_and_router(spec, depth)
    warned = []
    if random_weights(spec):
        given = "--pretrained none" if spec.pretrained is not None else "no --pretrained given"
        warned.append(f"random weights: {spec.model} with {given} embeds with a seeded random init, so the "
                      f"embeddings carry no meaning (fine for benchmarks and tests); pass --pretrained TAG or a "
                      f"checkpoint file for a searchable index")
    exit_at = check_exit_at(spec, depth)
    if exit_at:
        warned.append(exit_at)
    return warned


def image_size(spec: ModelSpec) -> int | None:
    """Return the side (pixels) the model of ``spec`` decodes images to, read from its config without torch; None
    when the config does not say (the shard tasks then wait for the model actor's description)."""
    try:
        size = ((model_config(spec.model, spec.pretrained) or {}).get("vision_cfg") or {}).get("image_size")
    except (ArgumentProblem, OSError, ValueError):
        return None
    if isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    return int(size) if isinstance(size, int) and not isinstance(size, bool) else None


def check_k(k: int, option: str = "-k") -> None:
    """Refuse a result count below 1 or above MAX_K."""
    if not 1 <= k <= MAX_K:
        raise ArgumentProblem(f"{option} {k}: give a number of results per query in 1..{MAX_K} (an index of fewer "
                              f"vectors returns them all)")


def check_nprobe(nprobe: int | None) -> None:
    """Refuse an --nprobe below 1 (None keeps the index's tuned value)."""
    if nprobe is not None and nprobe < 1:
        raise ArgumentProblem(f"--nprobe {nprobe}: give at least 1 inverted list to visit, or leave it out for the "
                              f"value tuned at build time")
