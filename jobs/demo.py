"""`make demo`: the whole pipeline offline on a fresh machine, with the shipped demo model, in a few minutes.

Makes a seeded demo corpus, embeds it with the demo CLIP + scorer + calibrated router (`icar embed`), builds
the index (`icar index`), runs a few text queries (`icar search`, which also writes their results as one page,
OUTPUT/search.html) and prints the cost report's summary (`icar report`). Every step is the real job, called in
one process that shares one embedded Ray instance.
"""

from __future__ import annotations

import argparse
import glob
import os
import time

from jobs import embed, index, make_demo_corpus, report, search
from jobs.common import HelpFormatter, add_logging_args, apply_logging
from pipeline.logs import setup_logging

# Caption-style queries: the demo CLIP ranks by colour and background first and is weak on shape and place
# (see pipeline/assets/demo/card.json, "attribute probe"), so short queries like "a red circle" find red backgrounds.
QUERIES = ["two red circles on a plain blue background", "a small yellow star on a striped green background",
           "three purple squares and a cyan ring on a noisy orange background with a few specks and lines"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="icar demo", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--output", "-o", default="demo-out", help="folder for the corpus, run, index and report")
    p.add_argument("--n", type=int, default=2000, help="images in the demo corpus")
    p.add_argument("--seed", type=int, default=0, help="corpus seed")
    add_logging_args(p, progress_help="no progress bars in any step")
    return p


def step(title: str) -> None:
    print(f"\n=== {title} " + "=" * max(0, 72 - len(title)), flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run the demo; return the first failing step's exit code, else 0."""
    setup_logging()
    args = build_parser().parse_args(argv)
    apply_logging(args)
    quiet = ["--no-progress"] if args.no_progress else []
    out = args.output
    corpus, run, idx = (os.path.join(out, name) for name in ("corpus", "run", "index"))
    t0 = time.perf_counter()
    if not os.path.exists(os.path.join(corpus, "corpus.json")):
        step(f"icar make-demo-corpus --n {args.n} --output {corpus}")
        rc = make_demo_corpus.main(["--n", str(args.n), "--output", corpus, "--seed", str(args.seed), *quiet])
        if rc:
            return rc
    shards = sorted(glob.glob(os.path.join(corpus, "test", "*.tar")))
    step(f"icar embed {corpus}/test/*.tar --output {run}")
    rc = embed.main([*shards, "--output", run, *quiet])
    if rc:
        return rc
    # --overwrite: a second `make demo` into the same folder resumes the embed (nothing left to do) and rebuilds
    # the index instead of stopping at "already holds an index".
    step(f"icar index {run} --output {idx} --overwrite")
    rc = index.main([run, "--output", idx, "--overwrite", *quiet])
    if rc:
        return rc
    page = os.path.join(out, "search.html")
    step(f"icar search {idx} " + " ".join(f'"{q}"' for q in QUERIES) + f" -k 5 --html {page}")
    rc = search.main([idx, *QUERIES, "-k", "5", "--html", page])
    if rc:
        return rc
    step(f"icar report {run}")
    rc = report.main([run, "--output", os.path.join(out, "report")])
    print(f"\nsearch results page: {page}")
    print(f"demo finished in {time.perf_counter() - t0:.0f}s; outputs under {out}/ "
          f"(open {page} and {out}/report/report.html)")
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
