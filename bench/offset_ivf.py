"""Benchmark: does the exit-offset dimension cost approximate search recall?

`icar index` scores an early-exit row ``scale * cosine + offset`` by giving the index one extra dimension (rows
``[scale * e, offset]``, queries ``[q, 1]``; docs/design.md, "Exit offsets"). An IVF index assigns rows and probes
lists by inner product, so the offset also moves which lists a query visits. This measures, side by side on one
held-out split of the demo corpus, the recall@k of an IVF,Flat index against its own exact ranking at each nprobe,
for the same routed mix of exits indexed three ways: uncalibrated (the embeddings as stored), scaled (the heads'
``exit_scales``) and scaled + offset (``exit_scales`` and ``exit_offsets``, one more dimension). Queries are the
split's captions. The mix is random, ``--mix`` shares of the exits, so every exit's rows are present.

    python -m bench.offset_ivf --corpus /work/demo-corpus-t10000

Recall only (no timing): the load average is printed for the record, the figures do not depend on it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import load_average, machine_facts  # noqa: E402
from bench.quality import add_split_args, embed_split  # noqa: E402
from pipeline.index.read import append_column, append_query_constant, offset_values, scale_rows  # noqa: E402
from pipeline.model import models  # noqa: E402
from pipeline.model.router import routed_embeddings  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.offset_ivf", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_split_args(p)
    p.add_argument("--mix", default="0.3,0.4,0.3", help="share of the images at each exit, shallowest first")
    p.add_argument("--nlist", type=int, default=None, help="IVF lists (default: about sqrt(n))")
    p.add_argument("--nprobe", default="1,2,4,8,16", help="nprobe values measured")
    p.add_argument("-k", type=int, default=10, help="recall@k against the exact top k")
    p.add_argument("--queries", type=int, default=2000, help="captions used as queries (the first ones)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random mix")
    p.add_argument("--json", default=None, help="write the results here as JSON")
    return p.parse_args(argv)


def ivf_recall(rows: np.ndarray, queries: np.ndarray, nlist: int, nprobes: list[int], k: int) -> dict[int, float]:
    """Return {nprobe: recall@k of IVF{nlist},Flat (inner product) against exact search on the same vectors}."""
    import faiss

    rows, queries = np.ascontiguousarray(rows, np.float32), np.ascontiguousarray(queries, np.float32)
    exact = faiss.IndexFlatIP(rows.shape[1])
    exact.add(rows)
    _, truth = exact.search(queries, k)
    ivf = faiss.index_factory(rows.shape[1], f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
    ivf.train(rows)
    ivf.add(rows)
    out = {}
    for nprobe in nprobes:
        faiss.extract_index_ivf(ivf).nprobe = nprobe
        _, got = ivf.search(queries, k)
        out[nprobe] = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(got, truth)]))
    return out


def main(argv=None) -> int:
    a = parse_args(argv)
    t0, load_start = time.perf_counter(), load_average()
    shares = [float(x) for x in a.mix.split(",")]
    nprobes = [int(x) for x in a.nprobe.split(",")]
    if abs(sum(shares) - 1) > 1e-6 or min(shares) < 0:
        raise SystemExit(f"--mix {a.mix}: give non-negative shares, one per exit, that sum to 1")
    corpus, keys, captions, heads, exits, emb, bundle = embed_split(a)
    if len(shares) != len(exits):
        raise SystemExit(f"--mix {a.mix}: give {len(exits)} shares, one per exit ({exits})")
    text = np.asarray(models.encode_text(bundle, captions[:a.queries]), np.float32)
    depth = np.random.default_rng(a.seed).choice(exits, size=len(keys), p=shares)
    stored = routed_embeddings(depth, {e: np.asarray(v, np.float32) for e, v in emb.items()})
    scales = tuple(sorted(heads.exit_scales.items()))
    offsets = tuple(sorted((e, b) for e, b in heads.exit_offsets.items() if b))
    scaled = scale_rows(stored.copy(), depth, scales)
    nlist = a.nlist or max(1, int(round(np.sqrt(len(keys)))))
    variants = {"uncalibrated": (stored, text), "scaled": (scaled, text),
                "scaled + offset": (append_column(scaled, offset_values(depth, offsets, len(scaled))),
                                    append_query_constant(text))}
    results = {name: ivf_recall(rows, q, nlist, nprobes, a.k) for name, (rows, q) in variants.items()}
    facts = machine_facts()
    print(f"# {facts['date']}, load average {load_start} at start, {load_average()} at end, icar {facts['git']}, "
          f"{time.perf_counter() - t0:.0f} s")
    print(f"{a.split} split of {corpus}: {len(keys)} images, exits {exits} at a random {a.mix} mix (seed {a.seed}); "
          f"{len(text)} captions as queries; IVF{nlist},Flat, inner product; recall@{a.k} against each index's own "
          f"exact ranking. Calibration: " + ", ".join(f"exit {e} {s:g} x cos {heads.exit_offsets[e]:+g}"
                                                      for e, s in scales if e != exits[-1]) + "\n")
    print("| vectors | dims | " + " | ".join(f"nprobe {p}" for p in nprobes) + " |")
    print("|---|---|" + "---|" * len(nprobes))
    for name, (rows, _) in variants.items():
        print(f"| {name} | {rows.shape[1]} | " + " | ".join(f"{results[name][p]:.3f}" for p in nprobes) + " |")
    if a.json:
        Path(a.json).write_text(json.dumps({"facts": facts, "corpus": corpus, "split": a.split, "images": len(keys),
                                            "exits": exits, "mix": shares, "nlist": nlist, "k": a.k,
                                            "queries": len(text), "recall": results,
                                            "load_average_start": load_start, "load_average_end": load_average()},
                                           indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
