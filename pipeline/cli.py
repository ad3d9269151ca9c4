"""The `icar` command: dispatches `icar <job> ...` to the job module jobs/<job>.py, which parses and calls pipeline/.

Every job speaks one grammar (jobs/common.py): the model, runtime (--device, --threads, --address), storage
(--storage-options) and logging (--no-progress, --log-format) groups mean the same in each job that has them.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

from pipeline import __version__
from pipeline.logs import setup_logging

# job name -> (module, one-line help). Every job is also `python -m jobs.<module>` (and `ray job submit -- ...`).
JOBS = {
    "embed": ("jobs.embed", "embed image shards into a run directory (scorer, router, early-exit CLIP) on Ray"),
    "index": ("jobs.index", "build a FAISS IVF-PQ index directory from one or more runs"),
    "search": ("jobs.search", "query an index with text or an image"),
    "report": ("jobs.report", "cost report: GFLOPs spent vs full depth, exit mix, throughput, cost"),
    "reindex": ("jobs.reindex", "scheduled incremental embed + versioned index from a YAML job config"),
    "calibrate": ("jobs.calibrate", "pick router thresholds for a GFLOP budget or a recall floor"),
    "train-exits": ("jobs.train_exits", "train early-exit heads (dual-path: contrastive + distillation)"),
    "train-confidence": ("jobs.train_confidence", "train confidence heads: exit where the embedding is already good"),
    "train-complexity": ("jobs.train_complexity", "train a ConvNeXt-IC complexity scorer on IC9600-layout data"),
    "eval-complexity": ("jobs.eval_complexity", "evaluate a complexity scorer: PLCC, SRCC, RMSE, MAE, images/s"),
    "train-scorer": ("jobs.train_scorer", "retrain the shipped default complexity scorer from SAVOIAS (ImageNet MobileNetV2)"),
    "demo": ("jobs.demo", "the whole pipeline offline on the shipped demo model (`make demo`)"),
    "make-demo-corpus": ("jobs.make_demo_corpus", "write the seeded synthetic demo corpus (WebDataset shards)"),
    "train-demo": ("jobs.train_demo", "retrain the shipped demo CLIP from the demo corpus"),
}


def usage() -> str:
    """Return the top-level help text."""
    width = max(map(len, JOBS))
    lines = ["usage: icar <job> [options]   (icar <job> --help for a job's options)", "", "jobs:"]
    for name, (module, text) in JOBS.items():
        available = importlib.util.find_spec(module) is not None
        lines.append(f"  {name:<{width}}  {text}" + ("" if available else "  [not in this build]"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run `icar <job> ...`; return the job's exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"icar {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in JOBS:
        print(f"icar: unknown job {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    setup_logging()
    module = importlib.import_module(JOBS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
