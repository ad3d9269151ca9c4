"""The cost report as text (a one-line summary and a readable summary) and as CSV rows a spreadsheet takes."""

from __future__ import annotations

import csv
import datetime as dt
import io
import math
import posixpath

from pipeline.report.audit import RANDOM_WEIGHTS, parse_time, random_weights

# --------------------------------------------------------------------------------------------------------------
# Text: the one-line summary and the readable summary


def fmt_num(x: float | None, digits: int = 1) -> str:
    """Return a GFLOP-like figure with thousands separators ('-' when unknown)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:,.{digits if abs(x) < 1e6 else 0}f}"


def fmt_sig(x: float | None, digits: int = 3) -> str:
    """Return ``x`` with about ``digits`` significant digits, keeping whole numbers whole ('-' when unknown)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if abs(x) >= 10 ** digits:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}" if x else "0"


def fmt_money(x: float | None, currency: str) -> str:
    if x is None:
        return "-"
    if abs(x) >= 100:
        text = f"{x:,.0f}"
    elif abs(x) >= 1:
        text = f"{x:,.2f}"
    else:
        text = fmt_sig(x, 3)
    return f"{text} {currency}".strip()


def fmt_when(stamp: str | None) -> str:
    """Return an ISO-8601 time stamp as 'YYYY-MM-DD HH:MM UTC' for people ('-' when unknown)."""
    if not stamp:
        return "-"
    t = parse_time(stamp, "time stamp").astimezone(dt.timezone.utc)
    return t.strftime("%Y-%m-%d %H:%M UTC")


def saved_phrase(pct: float | None, scored_not_routed: bool = False) -> str:
    """Return the GFLOPs saved against full depth in words; a run that scored every image but routed none by the
    score spent the scorer's GFLOPs for calibration, and says so instead of reading as a loss."""
    if pct is None:
        return "no baseline"
    if pct < 0 and scored_not_routed:
        return f"scored but not routed: {-pct:.1f}% more than full depth, for calibration"
    return f"{pct:.1f}% saved" if pct >= 0 else f"{-pct:.1f}% MORE than full depth"


def summary_line(report: dict) -> str:
    """Return the one-line summary of a report, e.g. for the end of `icar embed`.

    "36 images, 2 failed; 118.3 GFLOPs vs 317.5 at full depth: 62.7% saved; exits 6:12 9:10 12:14"
    """
    t = report["totals"]
    g = t["gflops"]
    failed = t["failed"]
    text = f"{t['images']} images, {failed['samples']} failed"
    if failed["input_shards"]:
        text += f" (+{failed['input_shards']} input shard{'s' if failed['input_shards'] != 1 else ''} failed)"
    text += (f"; {fmt_num(g['spent'])} GFLOPs vs {fmt_num(g['full_depth'])} at full depth: "
             f"{saved_phrase(g['saved_pct'], g.get('scored_not_routed', False))}")
    if t["exit_mix"]:
        text += "; exits " + " ".join(f"{e['depth']}:{e['images']}" for e in t["exit_mix"])
    if report["audit"]["status"] != "passed":
        text += f"; AUDIT FAILED ({t['audit']['row_violations']} rows disagree with run.json)"
    if any(random_weights(m.get("identity") or {}) for m in t["models"]):
        text += f"; {RANDOM_WEIGHTS}"
    return text


def _section_text(s: dict, indent: str = "  ") -> list[str]:
    g, t, c, f = s["gflops"], s["time"], s["cost"], s["failed"]
    cur = c["currency"]
    lines = []
    stages = ", ".join(f"{k} {v}" for k, v in sorted(f["by_stage"].items())) or "none"
    lines.append(f"{indent}images   {s['images']:,} embedded; {f['samples']:,} samples failed, "
                 f"{f['input_shards']} input shard(s) failed (by stage: {stages})")
    lines.append(f"{indent}GFLOPs   {fmt_num(g['spent'])} spent (scorer {fmt_num(g['scorer'])} + encoder "
                 f"{fmt_num(g['encoder'])}) "
                 f"vs {fmt_num(g['full_depth'])} at full depth")
    lines.append(f"{indent}         saved {fmt_num(g['saved'])} GFLOPs: "
                 f"{saved_phrase(g['saved_pct'], g.get('scored_not_routed', False))} "
                 f"({fmt_sig(g['spent_per_image'])} vs {fmt_sig(g['full_depth_per_image'])} GFLOPs per image)")
    if s["exit_mix"]:
        lines.append(f"{indent}exits    " + "   ".join(f"{e['depth']}: {e['images']:,} ({100 * e['share']:.1f}%)"
                                                      for e in s["exit_mix"]))
    wall = (f"{fmt_sig(t['wall_seconds'])} s wall over {t['invocations']} invocation(s) "
            f"({fmt_sig(t['images_per_second_wall'])} images/s)") if t["wall_seconds"] else "wall time not recorded"
    lines.append(f"{indent}time     {wall}; {fmt_sig(t['accelerator_seconds'])} accelerator-s "
                 f"({fmt_sig(t['images_per_accelerator_second'])} images/s) on {t['device']}")
    fd = c["full_depth"]
    lines.append(f"{indent}cost     {fmt_sig(c['accelerator_hours'])} accelerator-h = {fmt_money(c['cost'], cur)} as run; "
                 f"full depth {fmt_sig(fd['accelerator_hours'])} h = {fmt_money(fd['cost'], cur)} ({fd['basis'].upper()})")
    if c["saved_hours"] is not None:
        lines.append(f"{indent}         saved {fmt_sig(c['saved_hours'])} h = {fmt_money(c['saved_cost'], cur)} "
                     f"({saved_phrase(c['saved_pct'])})"
                     + (f"; realised efficiency {c['realised_efficiency']:.2f} (measured speedup / GFLOP-ratio "
                        f"speedup)"
                        if c["realised_efficiency"] is not None else ""))
    if fd["note"]:
        lines.append(f"{indent}         {fd['note']}")
    for note in t["notes"]:
        lines.append(f"{indent}note     {note}")
    a = s["audit"]
    lines.append(f"{indent}audit    {a['status']}: GFLOPs from rows {fmt_num(a['gflops_rows'], 3)} = manifest "
                 f"{fmt_num(a['gflops_manifest'], 3)} = per-depth counts x run.json {fmt_num(a['gflops_recomputed'], 3)}"
                 + (f"; {a['row_violations']} rows disagree with run.json" if a["row_violations"] else ""))
    return lines


def render_text(report: dict) -> str:
    """Return the readable summary printed by `icar report`."""
    cfg = report["config"]
    n_runs, n_models = len(report["runs"]), len(report["models"])
    plural = (lambda n, word: f"{n} {word}{'s' if n != 1 else ''}")
    head = (f"ICAR cost report: {plural(n_runs, 'run')}, {plural(n_models, 'model')}; "
            f"price {cfg['gpu_hour_price']:g} {cfg['currency']} per accelerator-hour")
    if cfg["since"] or cfg["until"]:
        head += f"; shards committed {cfg['since'] or '...'} to {cfg['until'] or '...'}"
    out = [head]
    sections = report["runs"] if n_runs == 1 else report["models"]
    for s in sections:
        label = s["name"] if s["scope"] == "run" else \
            f"model {s['name']} ({len(s['runs'])} run{'s' if len(s['runs']) != 1 else ''})"
        model = f"  [{s['models'][0]['label']}]" if s["scope"] == "run" else ""
        p = s["period"]
        when = f"  committed {fmt_when(p['first_committed'])} .. {fmt_when(p['last_committed'])}"
        out += ["", f"{label}{model}{when}"] + _section_text(s)
    if n_runs > 1:
        out += ["", "runs"]
        cur = report["totals"]["cost"]["currency"]
        for s in report["runs"]:
            g, c = s["gflops"], s["cost"]
            out.append(f"  {s['name']}  [{s['models'][0]['label']}]  {s['images']:,} images, "
                       f"{s['failed']['samples']:,} failed; {fmt_num(g['spent'])} vs {fmt_num(g['full_depth'])} GFLOPs: "
                       f"{saved_phrase(g['saved_pct'])}; "
                       f"{fmt_money(c['cost'], cur)} vs {fmt_money(c['full_depth']['cost'], cur)} at full depth "
                       f"({c['full_depth']['basis']}); audit {s['audit']['status']}")
        out += ["", "all runs"] + _section_text(report["totals"])
    comp = report["compare"]
    if comp:
        out += ["", f"compare: {', '.join(comp['a']['runs'])} (A) vs {comp['b']['runs'][0]} (B)"
                    + (" [B is a full-depth run]" if comp["b"]["full_depth_run"] else ""),
                f"  images in common {comp['common_images']:,}, only in A {comp['images_only_in_a']:,}, "
                f"only in B {comp['images_only_in_b']:,}" + ("" if comp["same_model"] else "; DIFFERENT MODELS")]
        for m in comp["metrics"]:
            ratio = f"  (B/A {m['b_over_a']:.2f})" if m["b_over_a"] is not None else ""
            out.append(f"  {m['metric']:<26} A {fmt_sig(m['a'], 4):>10}   B {fmt_sig(m['b'], 4):>10} {m['unit']}{ratio}")
    out += ["", "summary: " + summary_line(report)]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------------------
# CSV: flat rows a spreadsheet takes as is


def report_csv_rows(report: dict) -> list[dict]:
    """Return the report as flat rows: scope, metric, value, unit, note."""
    rows: list[dict] = []

    def add(scope, metric, value, unit="", note=""):
        if isinstance(value, float) and math.isnan(value):
            value = None
        rows.append({"scope": scope, "metric": metric, "value": "" if value is None else value, "unit": unit,
                     "note": note})

    sections = [("all", report["totals"])]
    sections += [(f"model:{s['models'][0]['key']}", s) for s in report["models"]]
    sections += [(f"run:{s['name']}", s) for s in report["runs"]]
    if report["compare"]:
        sections.append((f"compare:{report['compare']['b_section']['name']}", report["compare"]["b_section"]))
    for scope, s in sections:
        g, t, c, f = s["gflops"], s["time"], s["cost"], s["failed"]
        cur = c["currency"]
        add(scope, "runs", len(s["runs"]), "runs", "; ".join(s["runs"]))
        add(scope, "model", "; ".join(m["label"] for m in s["models"]), "", "; ".join(m["key"] for m in s["models"]))
        add(scope, "period.first_committed", s["period"]["first_committed"], "UTC")
        add(scope, "period.last_committed", s["period"]["last_committed"], "UTC")
        add(scope, "images.embedded", s["images"], "images")
        add(scope, "images.failed_samples", f["samples"], "images",
            ", ".join(f"{k} {v}" for k, v in sorted(f["by_stage"].items())))
        add(scope, "input_shards.failed", f["input_shards"], "shards",
            "; ".join(x["source"] for x in f["failed_input_shards"]))
        for k in ("spent", "scorer", "encoder", "full_depth", "saved"):
            add(scope, f"gflops.{k}", g[k], "GFLOPs", g["baseline"] if k == "full_depth" else "")
        add(scope, "gflops.saved_pct", g["saved_pct"], "%", "saved / full depth")
        add(scope, "gflops.spent_per_image", g["spent_per_image"], "GFLOPs/image")
        add(scope, "gflops.full_depth_per_image", g["full_depth_per_image"], "GFLOPs/image")
        for e in s["exit_mix"]:
            add(scope, f"exit.{e['depth']}.images", e["images"], "images")
            add(scope, f"exit.{e['depth']}.share", 100 * e["share"], "%")
            add(scope, f"exit.{e['depth']}.gflops", e["gflops"], "GFLOPs")
        for d in s["by_complexity_decile"]:
            name = f"decile.{d['decile']}" if d["decile"] is not None else "decile.unscored"
            rng = (f"complexity {d['complexity_min']:.3f}..{d['complexity_max']:.3f}"
                   if d["decile"] is not None else d.get("note", ""))
            add(scope, f"{name}.images", d["images"], "images", rng)
            add(scope, f"{name}.mean_exit_layer", d["mean_exit_layer"], "blocks", rng)
            add(scope, f"{name}.gflops_spent", d["gflops_spent"], "GFLOPs", rng)
            add(scope, f"{name}.gflops_full_depth", d["gflops_full_depth"], "GFLOPs", rng)
            add(scope, f"{name}.saved_pct", d["saved_pct"], "%", rng)
        if s["scope"] == "run":
            for sh in s["by_shard"]:
                name = f"shard.{posixpath.basename(sh['output']).removesuffix('.parquet')}"
                add(scope, f"{name}.images", sh["images"], "images", sh["source"])
                add(scope, f"{name}.failed", sh["failed"], "images", sh["source"])
                add(scope, f"{name}.gflops_spent", sh["gflops_spent"], "GFLOPs", sh["source"])
                add(scope, f"{name}.gflops_full_depth", sh["gflops_full_depth"], "GFLOPs", sh["source"])
                add(scope, f"{name}.saved_pct", sh["saved_pct"], "%", sh["source"])
                add(scope, f"{name}.accelerator_seconds", sh["accelerator_seconds"], "s", sh["source"])
        add(scope, "time.wall_seconds", t["wall_seconds"], "s", "; ".join(t["notes"]))
        add(scope, "time.images_per_second_wall", t["images_per_second_wall"], "images/s")
        add(scope, "time.accelerator_seconds", t["accelerator_seconds"], "s", f"device {t['device']}")
        add(scope, "time.images_per_accelerator_second", t["images_per_accelerator_second"], "images/s")
        add(scope, "time.reserved_gpu_hours", t["reserved_gpu_hours"], "GPU-h", "wall x GPUs reserved")
        add(scope, "time.model_busy_share", t["model_busy_share"], "fraction", "accelerator time / actor wall time")
        add(scope, "cost.accelerator_hours", c["accelerator_hours"], "h", "as run")
        add(scope, "cost.as_run", c["cost"], cur, f"at {c['price_per_hour']:g} {cur}/h")
        fd = c["full_depth"]
        add(scope, "cost.full_depth_accelerator_hours", fd["accelerator_hours"], "h",
            f"{fd['basis'].upper()}: {fd['note']}")
        add(scope, "cost.full_depth", fd["cost"], cur, f"{fd['basis'].upper()}: {fd['note']}")
        add(scope, "cost.saved", c["saved_cost"], cur, fd["basis"].upper())
        add(scope, "cost.saved_hours", c["saved_hours"], "h", fd["basis"].upper())
        add(scope, "cost.saved_pct", c["saved_pct"], "%", fd["basis"].upper())
        add(scope, "cost.realised_efficiency", c["realised_efficiency"], "ratio",
            "measured speedup / GFLOP-ratio speedup (1.0 = all GFLOP savings became time)")
        a = s["audit"]
        add(scope, "audit.status", a["status"], "", "rows = manifest = per-depth counts x run.json")
        add(scope, "audit.gflops_rows", a["gflops_rows"], "GFLOPs", "sum of the rows' gflops column")
        add(scope, "audit.gflops_manifest", a["gflops_manifest"], "GFLOPs", "sum of manifest.parquet gflops")
        add(scope, "audit.gflops_recomputed", a["gflops_recomputed"], "GFLOPs",
            "per-depth image counts x run.json gflops_per_exit + images x scorer_gflops")
        add(scope, "audit.row_violations", a["row_violations"], "rows", "rows whose gflops differ from run.json")
    if report["compare"]:
        comp = report["compare"]
        for m in comp["metrics"]:
            add("compare", f"{m['metric']}.a", m["a"], m["unit"], "; ".join(comp["a"]["runs"]))
            add("compare", f"{m['metric']}.b", m["b"], m["unit"], comp["b"]["runs"][0])
        add("compare", "common_images", comp["common_images"], "images", "keys present in both")
    return rows


def render_csv(report: dict) -> str:
    """Return report.csv's text."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["scope", "metric", "value", "unit", "note"], lineterminator="\n")
    w.writeheader()
    w.writerows(report_csv_rows(report))
    return buf.getvalue()
