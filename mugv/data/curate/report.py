"""The outputs of ``mugv curate``: ``clips.csv``, ``report.json`` and a static ``report.html``.

- ``clips.csv``: one row per clip, columns :data:`CSV_COLUMNS`: the source path, start/end
  frame (end exclusive) and seconds, every metric (empty when not measured), ``kept`` (1/0) and
  ``reason`` (``;``-joined failed checks). ``mugv preprocess --clips`` reads the kept rows.
- ``report.json``: counts (videos, clips, kept, per reason), failed videos with their reason,
  totals in hours, the thresholds, whether the aesthetic scorer ran, wall time.
- ``report.html``: the totals, histograms of each metric with the thresholds drawn
  (matplotlib, ``report_hist.png``) and thumbnails of kept clips and of rejected clips per
  reason (``thumbs/``). A plain page, no server and no scripts.

All three are written through a temporary file and ``os.replace``.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
import os
from pathlib import Path

from mugv.config import CurateConfig
from mugv.data.curate.scan import CLIP_METRICS
from mugv.data.curate.select import REASONS

__all__ = ["CSV_COLUMNS", "read_clips_csv", "summarize", "write_outputs"]

#: Columns of ``clips.csv``, in order.
CSV_COLUMNS = (
    "source", "clip", "start_frame", "end_frame", "start_s", "end_s", "duration_s", "num_frames",
    "width", "height", "fps", *CLIP_METRICS, "kept", "reason", "dup_group", "phash", "thumb",
)  # fmt: skip

#: Histogrammed metrics: (clip field, axis label, low threshold field, high threshold field).
_HISTS = (
    ("sharpness", "sharpness (Laplacian variance)", "min_sharpness", "max_sharpness"),
    ("motion", "motion (px/frame at the working size)", "min_motion", "max_motion"),
    ("brightness", "brightness (mean luma)", "min_brightness", "max_brightness"),
    ("black_fraction", "black-frame fraction", None, "max_black_fraction"),
    ("frozen_fraction", "frozen-frame fraction", None, "max_frozen_fraction"),
    ("duration_s", "duration (s)", "min_duration", "max_duration"),
    ("aesthetic", "aesthetic score", "min_aesthetic", None),
)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _cell(v) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, float):
        return "" if math.isnan(v) else repr(round(v, 6))
    if isinstance(v, list):
        return " ".join(str(x) for x in v)
    return str(v)


def _finite(rows: list[dict], key: str) -> list[float]:
    return [r[key] for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]


def summarize(videos: list[dict], rows: list[dict], cfg: CurateConfig, *, resumed: list[str], seconds: float) -> dict:
    """The ``report.json`` dict of a run (see the module docstring)."""
    failed = [{"source": v["source"], "reason": v["reason"]} for v in videos if v["status"] != "ok"]
    by_reason = {r: 0 for r in REASONS}
    for row in rows:
        for r in filter(None, row["reason"].split(";")):
            by_reason[r] = by_reason.get(r, 0) + 1
    first_reason = {r: 0 for r in REASONS}
    for row in rows:
        if row["reason"]:
            first_reason[row["reason"].split(";")[0]] += 1
    scored = sum(1 for r in rows if not math.isnan(r["aesthetic"]))
    hours = lambda xs: round(sum(xs) / 3600.0, 6)  # noqa: E731
    return {
        "videos": len(videos),
        "videos_ok": len(videos) - len(failed),
        "videos_failed": failed,
        "videos_resumed": len(resumed),
        "clips": len(rows),
        "kept": sum(r["kept"] for r in rows),
        "rejected_by_reason": {k: v for k, v in by_reason.items() if v},
        "rejected_by_first_reason": {k: v for k, v in first_reason.items() if v},
        "hours": {
            "scanned": hours(v["duration_s"] for v in videos if v["status"] == "ok"),
            "clips": hours(r["duration_s"] for r in rows),
            "kept": hours(r["duration_s"] for r in rows if r["kept"]),
        },
        "aesthetic": (f"ran on {scored} clips ({cfg.aesthetic_weights})" if cfg.aesthetic_weights
                      else "not run: no aesthetic_weights given (the low_aesthetic check was skipped)"),
        "thresholds": {k: getattr(cfg, k) for k in (
            "min_duration", "max_duration", "min_short_side", "min_fps", "min_sharpness", "max_sharpness",
            "min_motion", "max_motion", "min_brightness", "max_brightness", "max_black_fraction",
            "max_frozen_fraction", "min_aesthetic", "dedup_max_distance")},
        "work_short_side": cfg.work_short_side,
        "scan_seconds": round(sum(v.get("seconds", 0.0) for v in videos), 3),
        "wall_seconds": round(seconds, 3),
    }  # fmt: skip


def _histograms(rows: list[dict], cfg: CurateConfig, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [h for h in _HISTS if _finite(rows, h[0])]
    if not panels:
        return False
    cols = 3
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.0 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (key, label, lo, hi) in zip(axes.flat, panels):
        kept = _finite([r for r in rows if r["kept"]], key)
        rej = _finite([r for r in rows if not r["kept"]], key)
        ax.hist([kept, rej], bins=20, stacked=True, label=["kept", "rejected"], color=["tab:green", "tab:red"])
        for name, ls in ((lo, "--"), (hi, ":")):
            val = getattr(cfg, name) if name else 0
            if name and (val > 0 or name.startswith("min")):
                ax.axvline(val, color="k", ls=ls, lw=1.2, label=f"{name} = {val:g}")
        ax.set_xlabel(label)
        ax.set_ylabel("clips")
        ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    _atomic_write(path, buf.getvalue())
    return True


def _figure(row: dict) -> str:
    cap = (f"{Path(row['source']).name} #{row['clip']} {row['start_s']:.2f}-{row['end_s']:.2f} s<br>"
           f"sharp {row['sharpness']:.0f} · motion {row['motion']:.2f} · luma {row['brightness']:.0f}")
    if row["reason"]:
        cap += f"<br><b>{html.escape(row['reason'])}</b>"
    img = f'<img src="thumbs/{html.escape(row["thumb"])}" alt="">' if row["thumb"] else '<div class="none">no frame</div>'
    return f"<figure>{img}<figcaption>{cap}</figcaption></figure>"


def _html(report: dict, rows: list[dict], cfg: CurateConfig, hist: bool) -> str:
    esc = html.escape
    h = report["hours"]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>mugv curate report</title><style>"
        "body{font-family:sans-serif;margin:1.5em;max-width:1400px}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}figure{display:inline-block;margin:4px;"
        "width:200px;vertical-align:top;font-size:11px}figure img{max-width:200px;max-height:120px}"
        ".none{width:200px;height:60px;background:#eee}</style></head><body>",
        "<h1>mugv curate report</h1>",
        "<table>",
        f"<tr><th>videos</th><td>{report['videos']} ({report['videos_ok']} scanned, "
        f"{len(report['videos_failed'])} failed, {report['videos_resumed']} resumed)</td></tr>",
        f"<tr><th>clips</th><td>{report['clips']} ({report['kept']} kept)</td></tr>",
        f"<tr><th>hours</th><td>scanned {h['scanned']:.4f} · in clips {h['clips']:.4f} · kept {h['kept']:.4f}</td></tr>",
        f"<tr><th>aesthetic scorer</th><td>{esc(report['aesthetic'])}</td></tr>",
        f"<tr><th>working size</th><td>short side min(source, {cfg.work_short_side}) px</td></tr>",
        "</table>",
    ]
    if report["rejected_by_reason"]:
        parts.append("<h2>Rejections by reason</h2><table><tr><th>reason</th><th>clips</th></tr>")
        parts += [f"<tr><td>{esc(k)}</td><td>{v}</td></tr>" for k, v in report["rejected_by_reason"].items()]
        parts.append("</table>")
    if report["videos_failed"]:
        parts.append("<h2>Videos that failed</h2><table><tr><th>video</th><th>reason</th></tr>")
        parts += [f"<tr><td>{esc(f['source'])}</td><td>{esc(f['reason'])}</td></tr>" for f in report["videos_failed"]]
        parts.append("</table>")
    parts.append("<h2>Thresholds</h2><table>")
    parts += [f"<tr><th>{esc(k)}</th><td>{v}</td></tr>" for k, v in report["thresholds"].items()]
    parts.append("</table>")
    if hist:
        parts.append("<h2>Metrics</h2><p>Kept (green) and rejected (red) clips; dashed: lower threshold, "
                     "dotted: upper threshold.</p><img src='report_hist.png' alt='histograms'>")
    n = cfg.report_thumbs_per_reason
    groups = [("kept", [r for r in rows if r["kept"]])]
    for reason in REASONS:
        sel = [r for r in rows if r["reason"].split(";")[0] == reason]
        if sel:
            groups.append((reason, sel))
    parts.append("<h2>Clips</h2>")
    for name, sel in groups:
        parts.append(f"<h3>{esc(name)} ({len(sel)})</h3><div>")
        parts += [_figure(r) for r in sel[:n]]
        parts.append("</div>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_outputs(out: str | Path, videos: list[dict], rows: list[dict], cfg: CurateConfig, *,
                  resumed: list[str], seconds: float) -> dict:
    """Write ``clips.csv``, ``report.json``, ``report_hist.png`` and ``report.html`` to ``out``; returns the report."""
    out = Path(out)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for r in rows:
        w.writerow([_cell(r[c]) for c in CSV_COLUMNS])
    _atomic_write(out / "clips.csv", buf.getvalue().encode())
    report = summarize(videos, rows, cfg, resumed=resumed, seconds=seconds)
    _atomic_write(out / "report.json", json.dumps(report, indent=1).encode())
    if cfg.report:
        hist = _histograms(rows, cfg, out / "report_hist.png")
        _atomic_write(out / "report.html", _html(report, rows, cfg, hist).encode())
    return report


def read_clips_csv(path: str | Path, kept_only: bool = True) -> list[dict]:
    """Rows of a ``clips.csv`` as dicts with ``source`` (str), ``start_frame``/``end_frame`` (int,
    end exclusive), ``start_s``/``end_s`` (float), ``kept`` (bool) and ``reason``.

    Args:
        path: the CSV written by ``mugv curate``.
        kept_only: only rows with ``kept = 1``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a required column is missing or a frame range is invalid.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--clips {path}: no such file")
    need = {"source", "start_frame", "end_frame", "start_s", "end_s", "kept", "reason"}
    out = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not need <= set(reader.fieldnames):
            raise ValueError(f"{path}: expected the columns {sorted(need)} of mugv curate, got {reader.fieldnames}")
        for line, row in enumerate(reader, start=2):
            kept = row["kept"].strip() == "1"
            if kept_only and not kept:
                continue
            s, e = int(row["start_frame"]), int(row["end_frame"])
            if not 0 <= s < e:
                raise ValueError(f"{path}:{line}: invalid frame range [{s}, {e})")
            out.append({"source": row["source"], "start_frame": s, "end_frame": e, "start_s": float(row["start_s"]),
                        "end_s": float(row["end_s"]), "kept": kept, "reason": row["reason"]})
    return out
