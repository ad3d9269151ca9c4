"""`icar search IDX "a red bicycle" -k 10`: query an index with text (or --image) using the index's own model."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import unicodedata

from pipeline.embed.validate import ArgumentProblem, check_k, check_nprobe
from pipeline.index.search import Searcher
from pipeline.io import storage
from pipeline.io.storage import CorruptFileError
from pipeline.logs import setup_logging
from pipeline.model.models import ModelLoadError
from pipeline.reindex.root import INDEXES, LATEST, resolve_latest
from pipeline.report.audit import random_weights
from pipeline.report.gallery import Panel, Tile, add_thumbnails, thumbnail, write_gallery
from pipeline.runtime import resolve_device

from jobs.common import (HelpFormatter, add_logging_args, add_runtime_args, add_storage_args, apply_logging,
                         set_torch_threads)

log = logging.getLogger(__name__)

EXAMPLES = """
The text is encoded by the text tower of the model named in IDX/index.json (its weights hash is checked),
so results are only as good as that model. --image encodes a picture with the full-depth image tower.

examples:
  icar search idx/demo "a red bicycle" -k 5
  icar search idx/demo "a red bicycle" "a bowl of apples" --json        # one JSON document per query
  icar search idx/demo --image photo.jpg --nprobe 64
  icar search idx/demo "a red bicycle" -k 24 --html results.html         # look at the results: one page
  icar search s3://bucket/icar/laion-l14 "a red bicycle"                  # a reindex root: follows indexes/LATEST
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="icar search", description=__doc__, epilog=EXAMPLES, formatter_class=HelpFormatter)
    p.add_argument("index", help="index directory written by `icar index` (local path or URL)")
    p.add_argument("texts", nargs="*", help="text queries")
    p.add_argument("--image", action="append", default=[], help="image query (path or URL); repeatable")
    p.add_argument("-k", type=int, default=10, help="results per query (1..100000; at most the index's vectors)")
    p.add_argument("--nprobe", type=int, default=None, help="inverted lists to visit (default: the tuned value in index.json)")
    p.add_argument("--json", action="store_true", help="JSON for machines instead of a table")
    p.add_argument("--html", metavar="PATH", default=None,
                   help="also write one self-contained page (local path or URL): per query its text or image, then "
                        "the top-k images as thumbnails read back from their source shards, with key, score, exit "
                        "depth, complexity and caption")
    add_runtime_args(p, device_help="device of the query encoder",
                     threads_help="CPU threads of the query encoder (default: torch's choice)")
    add_storage_args(p)
    add_logging_args(p, progress_help="no progress bars (search draws none; accepted like every job's)")
    return p


# Invisible characters that reorder or hide the text around them (bidi embeddings, overrides, isolates; line and
# paragraph separators): a key could otherwise show as another key. Zero-width joiners stay (emoji need them).
_DECEPTIVE = frozenset([0x061C, 0x200E, 0x200F, 0x2028, 0x2029, *range(0x202A, 0x202F), *range(0x2066, 0x206A)])


def printable(text: str | None) -> str:
    """Return ``text`` safe to show on a terminal: control characters (C0, DEL, C1: the escape sequences that set
    a window title or clear the screen), lone surrogates and bidi overrides written as escapes like \\x1b."""
    text = text or ""
    if text.isprintable():  # the common case, at C speed: none of the characters below is printable
        return text
    return "".join(ascii(ch)[1:-1] if unicodedata.category(ch) in ("Cc", "Cs") or ord(ch) in _DECEPTIVE else ch
                   for ch in text)


def _clip(text: str | None, width: int) -> str:
    text = printable(text)
    return text if len(text) <= width else text[: max(0, width - 1)] + "…"


def format_table(query: str, hits: list) -> str:
    """Return a readable table of ``hits`` for one query."""
    width = shutil.get_terminal_size((120, 20)).columns
    key_w = min(32, max([3] + [len(printable(h.key)) for h in hits]))
    cap_w = max(20, (width - key_w - 18) // 2)
    lines = [f"query: {printable(query)}", f"{'#':>3}  {'score':>6}  {'key':<{key_w}}  {'caption':<{cap_w}}  url"]
    for rank, h in enumerate(hits, 1):
        lines.append(f"{rank:>3}  {h.score:6.3f}  {_clip(h.key, key_w):<{key_w}}  {_clip(h.caption, cap_w):<{cap_w}}  "
                     f"{printable(h.url)}")
    if not hits:
        lines.append("  (no results)")
    return "\n".join(lines)


def resolve_index_dir(path: str, storage_options: dict) -> str:
    """Return ``path``, or the index its ROOT/indexes/LATEST points to when ``path`` is an `icar reindex` root."""
    if not storage.exists(storage.join(path, "index.json"), storage_options) and \
            storage.exists(storage.join(path, INDEXES, LATEST), storage_options):
        return resolve_latest(path, storage_options)
    return path


def main(argv: list[str] | None = None) -> int:
    """Run the search job; return 0 on success, 2 on bad input."""
    args = build_parser().parse_args(argv)
    apply_logging(args)
    if not args.texts and not args.image:
        print("icar search: error: give a text query or --image PATH", file=sys.stderr)
        return 2
    try:
        check_k(args.k)
        check_nprobe(args.nprobe)
    except ArgumentProblem as e:
        print(f"icar search: error: {e}", file=sys.stderr)
        return 2
    set_torch_threads(args.threads)
    failed = False
    try:
        index_dir = resolve_index_dir(args.index, args.storage_options)
        with Searcher(index_dir, device=resolve_device(args.device), nprobe=args.nprobe,
                      storage_options=args.storage_options) as searcher:
            if random_weights(searcher.info.get("model") or {}):  # a --model without --pretrained: said first
                log.warning("%s", random_weights_warning(searcher))
            results = []
            if args.texts:
                results += list(zip(args.texts, searcher.search_text(args.texts, args.k)))
            if args.image:
                results += list(zip(args.image, searcher.search_image(args.image, args.k)))
            if args.html:
                try:
                    write_html(args.html, searcher, results, len(args.texts), args.storage_options)
                except OSError as e:  # the results are printed below all the same
                    print(f"icar search: error: cannot write --html {args.html}: {type(e).__name__}: {e}",
                          file=sys.stderr)
                    args.html = None
                    failed = True
    except (CorruptFileError, FileNotFoundError, ValueError, ModelLoadError) as e:  # bad paths, damaged index
        # files, images, mismatched models
        print(f"icar search: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        for query, hits in results:
            print(json.dumps({"query": query, "hits": [h.to_dict() for h in hits]}))
    else:
        print("\n\n".join(format_table(q, hits) for q, hits in results))
    if args.html:
        print(f"icar search: wrote {args.html}", file=sys.stderr)
    return 2 if failed else 0


def random_weights_warning(searcher: Searcher) -> str:
    """Return the sentence that says the index's embeddings are random (pipeline.report.audit.random_weights) and how
    to get meaningful ones."""
    model = searcher.info.get("model") or {}
    name = model.get("name", "?")
    seed = f", seed {model['seed']}" if "seed" in model else ""
    return (f"{searcher.index_dir} was embedded with random weights (model {name}, pretrained none{seed}): its "
            f"embeddings carry no meaning and neither do these results. Re-embed with trained weights, e.g. "
            f"`icar embed ... --model {name} --pretrained TAG` (an open_clip tag such as openai, or a checkpoint "
            f"file), then `icar index` again")


def write_html(url: str, searcher: Searcher, results: list, n_texts: int, storage_options: dict) -> str:
    """Write the results page (pipeline.report.gallery) for ``results`` (text queries first); return its URL."""
    hits = [h for _, found in results for h in found]
    details = iter(searcher.row_details(hits))
    panels = []
    for i, (query, found) in enumerate(results):
        panel = Panel(query=query, kind="text" if i < n_texts else "image")
        for h in found:
            d = next(details) or {}
            panel.tiles.append(Tile(key=h.key, score=h.score, source=h.source, caption=h.caption,
                                    exit_layer=d.get("exit_layer"), complexity=d.get("complexity")))
        if panel.kind == "image":
            try:
                panel.query_thumbnail = thumbnail(storage.read_bytes(query, storage_options or None))
            except (OSError, ValueError) as e:  # it was encoded a moment ago; a page without it is still useful
                panel.query_problem = f"{type(e).__name__}: {e}"
        panels.append(panel)
    add_thumbnails(panels, storage_options or None)
    model = searcher.info.get("model", {})
    meta = f"model {model.get('name', '?')}" + (f" ({model['pretrained']})" if model.get("pretrained") else "")
    warning = random_weights_warning(searcher) if random_weights(searcher.info.get("model") or {}) else None
    write_gallery(url, panels, searcher.index_dir, meta, storage_options or None, warning=warning)
    shown = sum(t.thumbnail is not None for p in panels for t in p.tiles)
    missing = [t for p in panels for t in p.tiles if t.thumbnail is None]
    if missing:
        log.warning("%d of %d result images could not be shown, e.g. %s: %s", len(missing), shown + len(missing),
                    missing[0].key, missing[0].problem)
    return url


if __name__ == "__main__":
    setup_logging()
    raise SystemExit(main())
