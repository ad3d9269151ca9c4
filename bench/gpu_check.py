"""Benchmark: the one prepared GPU check: ICAR's model stage on a borrowed GPU, in at most 6 minutes, one JSON.

Sized for the GPU machines this team borrows (one H100 or H200 for ~15 minutes, start-up included; torch,
torchvision, timm, pyarrow and pillow installed, open_clip, faiss and Ray not, nothing fetchable). open_clip and
its small dependencies travel as wheels in the ignored folder bench/wheels/, filled here once:

    .venv/bin/pip download --no-deps -d bench/wheels open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.5

and the device command is (carry: bench/wheels):

    python bench/gpu_check.py --wheels bench/wheels --out $OUT/gpu_check.json

What the JSON holds (every figure in-process, no Ray: Ray's own overhead is measured on CPU, see
docs/benchmarks/gpu-check.md):

- decode:    JPEG -> pixels images/s, nvJPEG on the GPU (pipeline.model.device_decode) vs Pillow on one CPU core,
             and the tolerance: max / mean absolute pixel difference against the CPU path (pipeline.io.decode);
- bare:      ``model.encode_image`` images/s, ViT-B-32 and ViT-L-14 (random init: speed does not depend on the
             weights), fp16 and bf16 autocast, batch sizes 64-512;
- worker:    the model actor's own code (``ModelWorker``: scorer + router + adaptive encoder) on the same batches,
             full depth and routed, from CPU-decoded pixels (``embed``) and from JPEG bytes decoded on the GPU
             (``embed_encoded``);
- adaptive:  realised speedup of the routed depth mix over full depth ÷ the speedup its counted GFLOPs allow
             (encoder alone, and the whole worker);
- tolerance: embedding cosine of GPU-decoded vs CPU-decoded inputs (ViT-B-32 worker, full depth);
- train_step: one exit-head training step (frozen backbone, dual-path loss, AdamW), seconds.

Robust by construction: each section runs in its own try/except and records its error in the JSON, the JSON is
rewritten after every section, sections that would not fit the time budget are skipped (and listed), and a
watchdog writes what there is and exits at the hard limit. ``--device cpu --smoke`` runs every section with the
shipped demo model and tiny batches (the test in tests/benchmarks/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import datetime as dt
import glob
import importlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

T0 = time.monotonic()  # run as a script, the 6-minute promise counts from here (Python's start-up is before it)
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `python bench/gpu_check.py` from anywhere: the repo is not installed there
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import git_commit, load_average, photo_jpeg  # noqa: E402
from pipeline.io.decode import DecodeConfig, EncodedBatch, decode_image, probe_jpeg  # noqa: E402
from pipeline.model import device_decode, models  # noqa: E402
from pipeline.model import encoder as enc  # noqa: E402
from pipeline.model import router as routers  # noqa: E402
from pipeline.model.spec import ModelSpec  # noqa: E402
from pipeline.model.worker import ModelWorker  # noqa: E402
from pipeline.training.exit_step import HeadTrainer, exit_losses  # noqa: E402

MODELS = ("ViT-B-32", "ViT-L-14")
PRECISIONS = ("fp16", "bf16")
BATCHES = (64, 128, 256, 512)
FRACTIONS = [1 / 3, 1 / 3, 1 / 3]  # routed: a third of the images at each of the three default exits
HARD_LIMIT_S = 360.0  # the JSON is written and the process ends by then, whatever runs
SITE = "/tmp/icar-gpu-check-site"  # where the carried wheels are installed (not the machine's own site-packages)
RAY_NOTE = ("every figure here ran in-process, without Ray (Ray is not installed on the GPU machines); Ray's own "
            "overhead per batch is measured on CPU (docs/benchmarks/throughput.md)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/gpu_check.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="where the JSON is written")
    p.add_argument("--wheels", default=None, help="folder of wheels to install when open_clip is missing")
    p.add_argument("--device", default="cuda", help="cuda (the check) or cpu (with --smoke: the test)")
    p.add_argument("--budget-s", type=float, default=330.0,
                   help="seconds the sections may take; a section that would not fit is skipped")
    p.add_argument("--models", default=",".join(MODELS), help="open_clip model names, comma-separated")
    p.add_argument("--precisions", default=",".join(PRECISIONS), help="autocast precisions, comma-separated")
    p.add_argument("--batches", default=None,
                   help="batch sizes, comma-separated (default: 64,128,256,512 on a GPU, 64 on a CPU)")
    p.add_argument("--decode-only", action="store_true",
                   help="only the decode section (its tolerance figures on CPU: --device cpu --decode-only)")
    p.add_argument("--smoke", action="store_true",
                   help="the shipped demo model, batches of 4 and 8, one precision: every code path, in seconds")
    return p.parse_args(argv)


class Check:
    """The JSON being built, its time budget, and the file it is written to after every section."""

    def __init__(self, args: argparse.Namespace, started: float):
        self.args = args
        self.started = started
        self.deadline = started + min(args.budget_s, HARD_LIMIT_S - 20)
        self.lock = threading.Lock()
        self.report: dict = {
            "check": "icar gpu_check", "version": 1,
            "started_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "argv": sys.argv[1:], "smoke": bool(args.smoke), "device": args.device,
            "ray": {"used": False, "note": RAY_NOTE},
            "budget_s": args.budget_s, "sections": {}, "errors": {}, "skipped": [], "complete": False,
        }

    def left(self) -> float:
        """Return the seconds left of the budget."""
        return self.deadline - time.monotonic()

    def fits(self, what: str, estimate_s: float) -> bool:
        """Return True when ``estimate_s`` more seconds fit the budget; else record ``what`` as skipped."""
        if self.left() >= estimate_s:
            return True
        self.report["skipped"].append(f"{what} (needs ~{estimate_s:.0f}s, {max(0.0, self.left()):.0f}s left)")
        return False

    @contextmanager
    def section(self, name: str):
        """Run one section: its figures go under sections[name], an exception under errors[name]; then write."""
        out: dict = {}
        with self.lock:
            self.report["sections"][name] = out
        t = time.monotonic()
        try:
            yield out
        except Exception as e:  # noqa: BLE001 - one section's failure must not cost the others' figures
            self.report["errors"][name] = f"{type(e).__name__}: {e}\n" + "".join(traceback.format_exc()[-2000:])
        finally:
            out["seconds"] = round(time.monotonic() - t, 2)
            if self.args.device.startswith("cuda") and torch.cuda.is_available():
                torch.cuda.empty_cache()
            self.write()

    def write(self, final: bool = False) -> None:
        """Write the JSON as it stands (atomically: a reader never sees half a file)."""
        with self.lock:
            self.report["elapsed_s"] = round(time.monotonic() - self.started, 1)
            if final:
                self.report["complete"] = not self.report["errors"] and not self.report["skipped"]
            text = json.dumps(self.report, indent=1, default=str)
        out = Path(self.args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, out)


def install_wheels(folder: str | None) -> dict:
    """Return what was done to make open_clip importable: nothing when it is, else the wheels of ``folder``
    installed into SITE (no index, no dependencies: the machine has the rest)."""
    try:
        import open_clip

        return {"installed": [], "open_clip": open_clip.__version__}
    except ImportError:
        pass
    wheels = sorted(glob.glob(os.path.join(folder or "", "*.whl"))) if folder else []
    if not wheels:
        raise FileNotFoundError(f"open_clip is not installed and no wheels were found in {folder!r}; fill the folder "
                                f"with `pip download --no-deps -d bench/wheels open_clip_torch ftfy wcwidth` and carry it")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--upgrade", "--target", SITE, *wheels], check=True, capture_output=True,
                   text=True, timeout=120)
    sys.path.insert(0, SITE)
    importlib.invalidate_caches()
    import open_clip

    return {"installed": [os.path.basename(w) for w in wheels], "open_clip": open_clip.__version__}


def machine(device: str) -> dict:
    """Return the facts printed beside the figures: device, libraries, commit, CPU load."""
    import torchvision

    facts = {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
             "cpu_count": os.cpu_count(), "load_average_1_5_15": load_average(), "git": git_commit()}
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(device)
        facts.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                     capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda)
    for mod in ("timm", "PIL", "numpy", "pyarrow"):
        try:
            facts[mod] = importlib.import_module(mod).__version__
        except Exception as e:  # noqa: BLE001 - a missing library is a fact to record
            facts[mod] = f"unavailable ({type(e).__name__})"
    return facts


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, images: int, smoke: bool, min_s: float = 0.4, max_iters: int = 8) -> dict:
    """Return images/s of ``fn`` (median of timed calls after warm-up) and the calls' median seconds."""
    for _ in range(1 if smoke else 2):
        fn()
    sync(device)
    times: list[float] = []
    while len(times) < (1 if smoke else 3) or (not smoke and sum(times) < min_s and len(times) < max_iters):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    return {"images_per_s": round(images / med, 1), "median_s": round(med, 5), "calls": len(times)}


def jpeg_batch(jpegs: list[bytes], image_size: int) -> EncodedBatch:
    """Return the EncodedBatch a shard task ships for ``jpegs`` (all probed as device-decodable)."""
    cfg = DecodeConfig(image_size=image_size)
    headers = [probe_jpeg(j, cfg) for j in jpegs]
    if any(h is None for h in headers):
        raise ValueError("a generated JPEG was not taken by probe_jpeg")
    return EncodedBatch(size=len(jpegs), max_pixels=cfg.max_pixels, jpeg_at=list(range(len(jpegs))), jpegs=jpegs,
                        headers=headers, pixels_at=[], pixels=np.zeros((0, image_size, image_size, 3), np.uint8))


def pixel_difference(device_pixels: torch.Tensor, cpu_pixels: np.ndarray) -> dict:
    """Return how far device-decoded pixels lie from the CPU path's: max and mean |difference|, shares above 2 and 8."""
    diff = np.abs(device_pixels.cpu().numpy().astype(np.int16) - cpu_pixels.astype(np.int16))
    return {"max_abs": int(diff.max()), "mean_abs": round(float(diff.mean()), 4),
            "share_over_2": round(float((diff > 2).mean()), 6), "share_over_8": round(float((diff > 8).mean()), 6)}


def run(args: argparse.Namespace, started: float, watchdog: bool) -> dict:
    """Run every section into the check's JSON; return the report. ``watchdog``: end the process at the hard
    limit (as a script only: inside a test run it would end the test runner)."""
    check = Check(args, started)
    timer = threading.Timer(max(1.0, HARD_LIMIT_S - (time.monotonic() - started) - 5), _hard_stop, args=(check,))
    timer.daemon = True
    if watchdog:
        timer.start()
    device = args.device
    smoke = args.smoke
    model_names = ("demo",) if smoke else tuple(args.models.split(","))
    precisions = ("bf16",) if smoke else tuple(args.precisions.split(","))
    # On a CPU (--decode-only: the tolerance figures) one batch of 64 takes minutes enough.
    batches = (4, 8) if smoke else ((64,) if device == "cpu" else BATCHES)
    if args.batches and not smoke:
        batches = tuple(int(b) for b in args.batches.split(","))
    n = max(batches)
    state: dict = {}

    with check.section("setup") as out:
        out.update(install_wheels(args.wheels))
        check.report["machine"] = machine(device)

    with check.section("data") as out:
        rng = np.random.default_rng(0)
        side = (96, 72) if smoke else (500, 375)  # a typical web photo; 40-120 KB at quality 90
        # 128 distinct photos repeated: decoding costs the same per copy, and generating one costs ~30 ms of CPU.
        unique = [photo_jpeg(rng, *side) for _ in range(min(n, 128))]
        jpegs = [unique[i % len(unique)] for i in range(n)]
        state["jpegs"] = jpegs
        # Camera-sized photos too: the CPU path decodes those in JPEG draft mode (DCT downscaling), the device
        # path whole, so the tolerance differs there.
        big = (300, 260) if smoke else (2048, 1536)
        state["big_jpegs"] = [photo_jpeg(rng, *big) for _ in range(4 if smoke else 8)]
        out.update(images=n, distinct=len(unique), width=side[0], height=side[1], mean_kib=round(sum(map(len, jpegs)) / n / 1024, 1),
                   big_images=len(state["big_jpegs"]), big_width=big[0], big_height=big[1])

    # The CPU path's pixels per model input size (64 for the demo, 224 for the ViTs).
    image_sizes = {name: 64 if name == "demo" else 224 for name in model_names}  # the ViTs named here take 224
    if args.decode_only:
        image_sizes = {"demo": 64, "ViT-B-32": 224}
    with check.section("decode") as out:
        for size in sorted(set(image_sizes.values())):
            cfg = DecodeConfig(image_size=size)
            t = time.perf_counter()
            cpu = np.stack([decode_image(j, cfg).pixels for j in state["jpegs"]])
            cpu_rate = n / (time.perf_counter() - t)
            state[("pixels", size)] = cpu
            batch = jpeg_batch(state["jpegs"], size)
            rows = {"cpu_pillow_one_core_images_per_s": round(cpu_rate, 1), "device": {}}
            for b in batches:
                sub = jpeg_batch(state["jpegs"][:b], size)
                rows["device"][str(b)] = timed(lambda: device_decode.decode_batch(sub, size, device), device, b, smoke)
            dev = device_decode.decode_batch(batch, size, device)
            if dev.errors or len(dev.index) != n:
                raise RuntimeError(f"device decoding failed on generated JPEGs: {dev.errors[:3]}")
            state[("device_pixels", size)] = dev.pixels
            rows["tolerance_vs_cpu_path"] = dict(pixel_difference(dev.pixels, cpu), fallbacks=dev.fallbacks)
            big = device_decode.decode_batch(jpeg_batch(state["big_jpegs"], size), size, device)
            big_cpu = np.stack([decode_image(j, cfg).pixels for j in state["big_jpegs"]])
            rows["tolerance_vs_cpu_path_big_jpegs"] = pixel_difference(big.pixels, big_cpu)
            out[str(size)] = rows

    for name in model_names if not args.decode_only else ():
        size = image_sizes[name]
        for precision in precisions:
            key = f"{name}/{precision}"
            estimate = 8 if smoke else (25 if name == "ViT-B-32" else 70)
            if not check.fits(f"model {key}", estimate):
                continue
            worker = None  # stays None when loading fails (the section records why)
            with check.section(f"load {key}") as out:
                spec = ModelSpec(model=name, pretrained=None, device=device, precision=precision,
                                 route_fractions=FRACTIONS, torch_threads=None)
                t = time.perf_counter()
                worker = ModelWorker(spec)
                out.update(load_s=round(time.perf_counter() - t, 1), exits=worker.exits,
                           gflops_per_exit=worker.gflops_per_exit, scorer_gflops=worker.scorer_gflops,
                           scorer=(worker.scorer.identity if worker.scorer is not None else None),
                           parameter_dtype=str(next(worker.bundle.model.parameters()).dtype),
                           autocast=str(worker.autocast), precision=str(getattr(worker, "precision", precision)))
            if worker is None:
                continue
            measure_model(check, worker, key, state, batches, device, smoke)
            del worker
            if device.startswith("cuda"):
                torch.cuda.empty_cache()

    if not args.decode_only and check.fits("train_step", 10 if smoke else 25):
        with check.section("train_step") as out:
            out.update(train_step(model_names[0], device, batches, smoke))

    check.write(final=True)
    timer.cancel()
    return check.report


def measure_model(check: Check, worker: ModelWorker, key: str, state: dict, batches, device: str, smoke: bool):
    """Time bare encode_image, the worker (full depth and routed, CPU pixels and GPU-decoded JPEGs) and the
    encoder's depth mix for one loaded model and precision; record the input-path tolerance once per model."""
    size = worker.bundle.image_size
    pixels = state[("pixels", size)]
    keys = [f"k{i:06d}" for i in range(len(pixels))]
    dtype = worker.autocast
    devtype = device.split(":")[0]
    routed = worker.router
    full = routers.FixedRouter(worker.exits[-1])

    with check.section(f"bare {key}") as out:
        # In the parameters' dtype: a CPU worker casts its weights (bf16), a GPU worker keeps fp32 under autocast.
        x_all = models.pixels_to_tensor(worker.bundle, pixels, device=device,
                                        dtype=next(worker.bundle.model.parameters()).dtype)
        for b in batches:
            if not check.fits(f"bare {key} batch {b}", 3):
                break
            x = x_all[:b]

            def bare():
                with torch.inference_mode(), torch.autocast(devtype, dtype=dtype, enabled=dtype is not None):
                    return worker.bundle.model.encode_image(x)

            out[str(b)] = timed(bare, device, b, smoke)
        out["autocast"] = str(dtype)

    with check.section(f"worker {key}") as out:
        for b in batches:
            if not check.fits(f"worker {key} batch {b}", 8):
                break
            px, ks = pixels[:b], keys[:b]
            jb = jpeg_batch(state["jpegs"][:b], size)
            row = {}
            for depth, router in (("full", full), ("routed", routed)):
                worker.router = router  # the same loaded models, routed two ways (ModelWorker's public router)
                row[f"{depth}_cpu_pixels"] = timed(lambda: worker.embed(px, ks), device, b, smoke)
                try:  # the GPU decode path is new: its failure must not cost the CPU-pixel figures beside it
                    row[f"{depth}_gpu_decode"] = timed(lambda: worker.embed_encoded(jb, ks), device, b, smoke)
                except Exception as e:  # noqa: BLE001 - recorded in the JSON, the check goes on
                    row[f"{depth}_gpu_decode"] = {"error": f"{type(e).__name__}: {e}"}
                    check.report["errors"].setdefault(f"worker {key} gpu decode", traceback.format_exc()[-2000:])
                result = worker.embed(px, ks)
                row[f"{depth}_mean_gflops"] = round(float(np.mean(result["gflops"])), 4)
                row[f"{depth}_exit_mix"] = {str(int(d)): int(c) for d, c in
                                            zip(*np.unique(result["exit_layer"], return_counts=True))}
            worker.router = routed
            bound = row["full_mean_gflops"] / row["routed_mean_gflops"]
            speedup = row["routed_cpu_pixels"]["images_per_s"] / row["full_cpu_pixels"]["images_per_s"]
            row["speedup_routed_vs_full"] = round(speedup, 3)
            if "images_per_s" in row["routed_gpu_decode"] and "images_per_s" in row["full_gpu_decode"]:
                row["speedup_routed_vs_full_gpu_decode"] = round(
                    row["routed_gpu_decode"]["images_per_s"] / row["full_gpu_decode"]["images_per_s"], 3)
            row["gflops_bound"] = round(bound, 3)
            row["realised"] = round(speedup / bound, 3)
            out[str(b)] = row
        out["note"] = ("images/s of ModelWorker.embed (CPU-decoded uint8 pixels in, as the actor gets them from the "
                       "shard tasks) and ModelWorker.embed_encoded (JPEG bytes in, decoded on the device); the "
                       "scorer's GFLOPs are in the mean GFLOPs and its time in the images/s")

    with check.section(f"adaptive {key}") as out:
        b = max(batches)
        x = models.pixels_to_tensor(worker.bundle, pixels[:b], device=device)
        mix = torch.as_tensor(routed.route(worker.scorer.score(pixels[:b]) if worker.scorer is not None
                                           else np.full(b, np.nan, np.float32), keys[:b]), dtype=torch.long)
        every = torch.full((b,), worker.exits[-1], dtype=torch.long)
        times = {}
        for name, depths in (("full", every), ("routed", mix)):
            d = depths.to(device)

            def forward():
                with torch.inference_mode(), torch.autocast(devtype, dtype=dtype, enabled=dtype is not None):
                    return worker.encoder(x, d)

            times[name] = timed(forward, device, b, smoke)
        g = worker.gflops_per_exit
        bound = g[worker.exits[-1]] / float(np.mean([g[int(e)] for e in mix.tolist()]))
        speedup = times["routed"]["images_per_s"] / times["full"]["images_per_s"]
        out.update(batch=b, encoder=times, gflops_bound=round(bound, 3), speedup=round(speedup, 3),
                   realised=round(speedup / bound, 3),
                   exit_mix={str(int(d)): int(c) for d, c in zip(*np.unique(mix.numpy(), return_counts=True))})

    if ("tolerance", size) not in state:
        with check.section(f"tolerance {key}") as out:
            worker.router = full
            b = max(batches)
            cpu_emb = worker.embed(pixels[:b], keys[:b])["embedding"].astype(np.float32)
            dev_emb = worker.embed(state[("device_pixels", size)][:b], keys[:b])["embedding"].astype(np.float32)
            cos = (cpu_emb * dev_emb).sum(1)
            worker.router = routed
            state[("tolerance", size)] = True
            out.update(batch=b, cosine_min=round(float(cos.min()), 6), cosine_mean=round(float(cos.mean()), 6),
                       note="full-depth embeddings of device-decoded vs CPU-decoded pixels of the same JPEGs "
                            "(the ViTs here have random-init weights: nothing to fetch on the GPU machine)")


def train_step(name: str, device: str, batches, smoke: bool) -> dict:
    """Return the seconds of one exit-head training step (frozen recipe: features at the exits, dual-path loss)."""
    bundle = models.load_clip(name, None, device=device)
    exits = enc.default_exits(bundle.num_blocks)
    heads = enc.ExitHeads.for_bundle(bundle, exits)
    encoder = enc.AdaptiveEncoder(bundle.model.visual, exits, heads).to(device).eval()
    trainer = HeadTrainer(heads, init_logit_scale=math.log(1 / 0.07), learn_temperature=True,
                          full_depth=bundle.num_blocks).to(device)
    opt = torch.optim.AdamW([p for p in trainer.parameters() if p.requires_grad], lr=1e-4)
    b = 64 if smoke else 256
    b = min(b, max(batches))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b, 3, bundle.image_size, bundle.image_size, generator=gen).to(device)
    text = torch.nn.functional.normalize(torch.randn(b, bundle.embed_dim, generator=gen), dim=-1).to(device)

    def step():
        with torch.no_grad():
            feats, full = encoder.exit_features(x)
        opt.zero_grad(set_to_none=True)
        loss, parts = exit_losses(trainer, feats, full, text, 1.0, 1.0)
        loss.backward()
        opt.step()
        return float(loss.detach())

    losses = [step()]
    sync(device)
    t = time.perf_counter()
    losses.append(step())
    sync(device)
    seconds = time.perf_counter() - t
    if not all(math.isfinite(v) for v in losses):
        raise FloatingPointError(f"exit-head training loss is not finite: {losses}")
    return {"model": name, "batch": b, "exits": exits, "step_s": round(seconds, 4), "losses": losses,
            "note": "fp32, backbone frozen (features under no_grad), heads + temperatures trained with AdamW"}


def _hard_stop(check: Check) -> None:
    """Write what there is and end the process: the check must finish within its 6 minutes whatever hangs."""
    try:
        check.report["errors"]["hard_limit"] = f"stopped at {HARD_LIMIT_S:.0f}s by the watchdog"
        check.write()
    finally:
        os._exit(3)


def main(argv: list[str] | None = None, started: float | None = None, as_script: bool = False) -> int:
    """Run the check; return 0 when every section ran within the budget, 1 otherwise, 2 without the device.

    ``as_script``: the process is the check's own (the watchdog may end it; environment and threads are set)."""
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA device here; run it on the GPU machine, or with --device cpu --smoke",
              file=sys.stderr)
        return 2
    if as_script:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is fetchable there; random init needs no download
        if not args.device.startswith("cuda"):
            torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    report = run(args, started if started is not None else time.monotonic(), watchdog=as_script)
    print(json.dumps({k: report[k] for k in ("complete", "elapsed_s", "skipped")} | {"errors": list(report["errors"])}))
    return 0 if report["complete"] else 1


if __name__ == "__main__":
    sys.exit(main(started=T0, as_script=True))
