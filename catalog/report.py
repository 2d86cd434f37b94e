"""One static HTML page that tells a person in a minute whether the thresholds are right.

``python -m catalog report DB --output report.html`` writes a single self-contained file (pictures embedded as
base64): counts per stage and per reject reason, the thresholds with how many clips each one drops, a histogram per
thresholded score with its limits marked, contact sheets of kept and rejected clips (the preview strip curation
stored in ``clips.preview_jpeg``, scores, caption, reasons) and the bucket table of the shards written so far.

The catalog is opened read-only; the report never changes it, and it never opens a source video: the catalog is
enough, wherever the sources went since.
"""
from __future__ import annotations

import base64
import dataclasses
import html
import json
import math
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import numpy as np

from catalog import db


@dataclasses.dataclass(frozen=True, slots=True)
class ReportOptions:
    clips_per_sheet: int = 12  # clips on each contact sheet (kept, rejected)
    thumb_height: int = 80  # pixels the stored preview strips are shown at
    bins: int = 40  # histogram bins

    def __post_init__(self) -> None:
        if self.clips_per_sheet < 0 or self.thumb_height < 16 or self.bins < 2:
            raise ValueError(f"expected clips_per_sheet >= 0, thumb_height >= 16, bins >= 2; got {self}")


@dataclasses.dataclass(frozen=True, slots=True)
class ReportSummary:
    path: Path
    bytes: int
    thumbnails: int  # preview strips embedded (one per card that has one)
    missing_previews: int  # cards without a stored preview (shown with a placeholder saying so)


# Score columns with a histogram, in page order; each is marked with the thresholds that read it.
SCORE_COLUMNS: tuple[str, ...] = tuple(dict.fromkeys(r.column for r in db.THRESHOLD_RULES))
CARD_SCORES: tuple[tuple[str, str, str], ...] = (
    ("aesthetic_mean", "aesthetic", "{:.2f}"),
    ("watermark_prob", "watermark", "{:.2f}"),
    ("motion_mean", "motion", "{:.1f}"),
    ("sharpness_median", "sharpness", "{:.4f}"),
    ("overlay_score", "overlay", "{:.2f}"),
    ("text_area_max", "text area", "{:.3f}"),
    ("caption_similarity", "caption sim", "{:.3f}"),
    ("duration", "seconds", "{:.1f}"),
)


# ---------------------------------------------------------------------------------------------------------
# Histograms (inline SVG, no plotting dependency)


def histogram_svg(values: np.ndarray, limits: Sequence[tuple[str, str, float]], *, title: str, bins: int = 40,
                  nulls: int = 0, width: int = 420, height: int = 170) -> str:
    """SVG histogram of ``values`` with each limit drawn as a labelled vertical line.

    Args:
        values: finite scores (1-D).
        limits: (threshold name, op '>=' or '<=', value) for each active threshold on this score.
        title: the score's name.
        nulls: how many clips have no score (told in the caption).
    Bars in a region that passes every limit are green, the others red.
    """
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    pad_l, pad_r, pad_t, pad_b = 36, 10, 22, 34
    plot_w, plot_h = width - pad_l - pad_r, height - pad_t - pad_b
    parts = [f'<svg class="histogram" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="{html.escape(title)} histogram">',
             f'<text x="{pad_l}" y="14" class="h-title">{html.escape(title)}</text>']
    if values.size == 0:
        parts.append(f'<text x="{pad_l}" y="{pad_t + plot_h / 2}" class="h-empty">no scores ({nulls} NULL)</text>')
        parts.append("</svg>")
        return "".join(parts)
    lo, hi = np.percentile(values, [0.5, 99.5]) if values.size > 50 else (values.min(), values.max())
    for _, _, v in limits:
        lo, hi = min(lo, v), max(hi, v)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    span = hi - lo
    lo, hi = lo - 0.02 * span, hi + 0.02 * span
    counts, edges = np.histogram(np.clip(values, lo, hi), bins=bins, range=(lo, hi))
    top = max(int(counts.max()), 1)
    x_of = lambda v: pad_l + (v - lo) / (hi - lo) * plot_w  # noqa: E731
    bar_w = plot_w / bins
    for i, c in enumerate(counts):
        if c == 0:
            continue
        mid = (edges[i] + edges[i + 1]) / 2
        ok = all(mid >= v if op == ">=" else mid <= v for _, op, v in limits)
        h = c / top * plot_h
        parts.append(f'<rect class="{"pass" if ok else "fail"}" x="{pad_l + i * bar_w:.1f}" '
                     f'y="{pad_t + plot_h - h:.1f}" width="{max(bar_w - 1, 1):.1f}" height="{h:.1f}">'
                     f'<title>{edges[i]:.4g} to {edges[i + 1]:.4g}: {c}</title></rect>')
    base_y = pad_t + plot_h
    parts.append(f'<line class="axis" x1="{pad_l}" y1="{base_y}" x2="{pad_l + plot_w}" y2="{base_y}"/>')
    for v, anchor in ((lo, "start"), ((lo + hi) / 2, "middle"), (hi, "end")):
        parts.append(f'<text class="tick" x="{x_of(v):.1f}" y="{base_y + 12}" text-anchor="{anchor}">{v:.3g}</text>')
    parts.append(f'<text class="tick" x="{pad_l - 4}" y="{pad_t + 8}" text-anchor="end">{top}</text>')
    for k, (name, op, v) in enumerate(limits):
        x = x_of(v)
        anchor = "start" if x < pad_l + plot_w * 0.7 else "end"
        dx = 3 if anchor == "start" else -3
        parts.append(f'<line class="limit" x1="{x:.1f}" y1="{pad_t - 4}" x2="{x:.1f}" y2="{base_y}"/>')
        parts.append(f'<text class="limit-label" x="{x + dx:.1f}" y="{pad_t + 10 + 12 * k}" text-anchor="{anchor}">'
                     f'{html.escape(name)} {html.escape(op)} {v:.4g}</text>')
    parts.append(f'<text class="tick" x="{pad_l}" y="{height - 4}">n={values.size:,}'
                 f'{f", {nulls:,} without a score" if nulls else ""}</text>')
    parts.append("</svg>")
    return "".join(parts)


# ---------------------------------------------------------------------------------------------------------
# Previews

JPEG_MAGIC = b"\xff\xd8\xff"


def _preview_img(preview: bytes | None, height: int) -> str | None:
    """An <img> embedding the stored JPEG as it is (no decode, no re-encode); None when there is none to show."""
    if not preview or not bytes(preview).startswith(JPEG_MAGIC):
        return None
    uri = "data:image/jpeg;base64," + base64.b64encode(bytes(preview)).decode()
    return f'<img class="thumb" alt="frames across the clip" height="{height}" src="{uri}">'


# The frame gap curation leaves between the strip's frames, in px of its 128-px-high strip (pipeline.analyze).
PREVIEW_GAP = 3
# Boxes drawn over every frame of a card's strip: the column, its label, the CSS class that colours it.
BOX_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("text_persistent_box", "persistent text (OCR)", "box-text"),
    ("text_mark_box", "corner text mark (OCR read)", "box-mark"),
    ("overlay_box", "static overlay", "box-overlay"),
)


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's frame header, without decoding it; None when there is none."""
    i = 2
    while i + 9 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a start-of-frame: height, then width
            return int.from_bytes(data[i + 7:i + 9], "big"), int.from_bytes(data[i + 5:i + 7], "big")
        i += 2 + length
    return None


def _box_overlays(clip: dict, preview: bytes) -> str:
    """Absolutely placed outlines of the clip's text and overlay boxes on each frame of its preview strip.

    The strip holds k frames of one width side by side with PREVIEW_GAP between them; k follows from the strip's
    width and the clip's aspect. Percentages keep the boxes on the frames at whatever height the page shows it.
    """
    boxes = [(b, label, cls) for col, label, cls in BOX_COLUMNS
             if isinstance(b := clip.get(col), (list, tuple)) and len(b) == 4 and all(v is not None for v in b)]
    size = jpeg_size(bytes(preview)) if boxes else None
    if not boxes or size is None or not clip.get("width") or not clip.get("height"):
        return ""
    strip_w, strip_h = size
    frame_w = strip_h * clip["width"] / clip["height"]
    k = max(1, round((strip_w + PREVIEW_GAP) / (frame_w + PREVIEW_GAP)))
    frame_w = (strip_w - PREVIEW_GAP * (k - 1)) / k
    out = []
    for (x0, y0, x1, y1), label, cls in boxes:
        for f in range(k):
            left = (f * (frame_w + PREVIEW_GAP) + x0 * frame_w) / strip_w
            width = (x1 - x0) * frame_w / strip_w
            out.append(f'<div class="box {cls}" title="{_e(label)}" style="left: {100 * left:.2f}%; '
                       f'top: {100 * y0:.2f}%; width: {100 * width:.2f}%; height: {100 * (y1 - y0):.2f}%"></div>')
    return "".join(out)


# ---------------------------------------------------------------------------------------------------------
# Gathering


def _rows(con: duckdb.DuckDBPyConnection, sql: str, params: list | None = None) -> list[dict]:
    # Arrow, not fetchall: TIMESTAMPTZ to Python needs pytz, which is not a dependency.
    return con.execute(sql, params or []).to_arrow_table().to_pylist()


def _scalar(con: duckdb.DuckDBPyConnection, sql: str) -> int:
    return con.execute(sql).fetchone()[0]


def _sheet_clips(con: duckdb.DuckDBPyConnection, kept: bool, n: int) -> list[dict]:
    """Clips for a contact sheet, with their video row and failed thresholds.

    Kept: spread from the lowest aesthetic score up (the borderline ones matter most). Rejected: round-robin over
    the reasons, so every reason shows examples. Ids are chosen on narrow columns first; full rows are fetched for
    the chosen few only.
    """
    if n == 0:
        return []
    if kept:
        total = _scalar(con, "SELECT count(*) FROM kept_clips")
        k = min(n, total)
        ranks = sorted({round(i * (total - 1) / max(k - 1, 1)) for i in range(k)})
        ids = [r[0] for r in con.execute("""
            SELECT clip_id FROM (
                SELECT clip_id, row_number() OVER (ORDER BY aesthetic_mean NULLS FIRST, clip_id) - 1 AS rn
                FROM kept_clips)
            WHERE list_contains(?, rn) ORDER BY rn""", [ranks]).fetchall()]
    else:
        # Per reason, the n clips with the smallest hash: a stable pseudo-random sample, no sort of all rows.
        per_reason = con.execute(f"""
            SELECT reason, min_by(clip_id, hash(clip_id), {int(n)}) FROM (
                SELECT clip_id, unnest(CASE WHEN len(reject_reasons) + len(failed_thresholds) = 0 THEN ['?']
                                       ELSE list_concat(reject_reasons, failed_thresholds) END) AS reason
                FROM clip_verdicts WHERE NOT kept)
            GROUP BY reason ORDER BY count(*) DESC, reason""").fetchall()
        ids = []
        for depth in range(n):
            for _, candidates in per_reason:
                if depth < len(candidates) and candidates[depth] not in ids and len(ids) < n:
                    ids.append(candidates[depth])
    if not ids:
        return []
    rows = _rows(con, """
        SELECT c.*, v.failed_thresholds, to_json(vid) AS video_json
        FROM clips c JOIN clip_verdicts v USING (clip_id) JOIN videos vid ON vid.video_id = c.video_id
        WHERE list_contains(?, c.clip_id)""", [ids])
    order = {clip_id: i for i, clip_id in enumerate(ids)}
    rows.sort(key=lambda r: order[r["clip_id"]])
    for row in rows:
        row["video"] = json.loads(row.pop("video_json"))
    return rows


def _run_counts(con: duckdb.DuckDBPyConnection) -> list[dict]:
    """Per run: its latest attempt's counts JSON, flattened (stage -> value)."""
    rows = _rows(con, """
        SELECT run_id, count(*) AS attempts, min(started_at) AS started_at, sum(wall_seconds) AS wall_seconds,
               arg_max(counts, finished_at) AS counts, any_value(input) AS input, bool_or(standin_models) AS standin
        FROM runs GROUP BY run_id ORDER BY min(started_at)""")
    for row in rows:
        try:
            counts = json.loads(row["counts"]) if row["counts"] else {}
        except json.JSONDecodeError:
            counts = {"counts": row["counts"]}
        row["counts"] = counts if isinstance(counts, dict) else {"counts": counts}
    return rows


# ---------------------------------------------------------------------------------------------------------
# Rendering


def _e(value: object) -> str:
    return html.escape("" if value is None else str(value))


def _fmt(value: object, pattern: str = "{}") -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return ", ".join(f"{k}={_fmt(v)}" for k, v in value.items())
    try:
        return pattern.format(value)
    except (ValueError, TypeError):
        return str(value)


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]], *, cls: str = "") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; background: #fafafa; }
h1 { margin: 0 0 4px; } h2 { margin: 28px 0 8px; border-bottom: 1px solid #ddd; }
.meta { color: #666; }
table { border-collapse: collapse; margin: 6px 0; background: #fff; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f0f0f0; } td.num, th.num { text-align: right; }
.funnel td:nth-child(2) { text-align: right; font-variant-numeric: tabular-nums; }
.hists { display: flex; flex-wrap: wrap; gap: 12px; }
.histogram { background: #fff; border: 1px solid #ddd; }
.histogram .pass { fill: #4caf50; } .histogram .fail { fill: #e57373; }
.histogram .axis { stroke: #555; } .histogram .limit { stroke: #111; stroke-width: 2; stroke-dasharray: 4 2; }
.histogram text { font: 11px system-ui, sans-serif; fill: #333; }
.histogram .h-title { font-weight: bold; font-size: 12px; } .histogram .limit-label { font-weight: bold; }
.sheet { display: flex; flex-wrap: wrap; gap: 10px; }
/* A 1px-wide table shrinks the card to its thumbnail row; the text wraps under it. */
.card { display: table; width: 1px; min-width: 260px; background: #fff; border: 2px solid #ccc;
        border-radius: 4px; padding: 6px; }
.card.kept { border-color: #4caf50; } .card.rejected { border-color: #e57373; }
.thumbs { display: flex; gap: 2px; width: fit-content; background: #111; }
.strip { position: relative; line-height: 0; }
.box { position: absolute; box-sizing: border-box; border: 2px solid; pointer-events: none; }
.box-text { border-color: #ff9800; } .box-overlay { border-color: #2962ff; } .box-mark { border-color: #d500f9; }
.missing { color: #b00; font-size: 12px; padding: 4px; max-width: 420px; background: #fee; box-sizing: border-box; }
.clip-id { font: 11px monospace; color: #555; word-break: break-all; }
.caption { font-style: italic; margin: 4px 0; }
.scores { font-size: 12px; color: #333; }
.reason { display: inline-block; background: #e57373; color: #fff; border-radius: 3px; padding: 0 5px;
          margin: 2px 2px 0 0; font-size: 12px; }
.note { color: #666; font-size: 13px; }
"""

# Marks the page once the browser has loaded every picture, and flags pictures that failed to decode.
SCRIPT = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.querySelectorAll('img'));
  var broken = imgs.filter(function (i) { return !i.complete || i.naturalWidth === 0; });
  document.body.setAttribute('data-images-loaded', String(imgs.length - broken.length));
  document.body.setAttribute('data-images-broken', String(broken.length));
  broken.forEach(function (i) { i.style.outline = '3px solid red'; });
});
"""


def _card(clip: dict, kept: bool, opts: ReportOptions) -> tuple[str, int, bool]:
    """HTML for one clip; returns (html, previews embedded, preview missing)."""
    video = clip["video"]
    preview = clip.get("preview_jpeg")  # absent altogether in a catalog written before previews were kept
    thumbs = _preview_img(preview, opts.thumb_height)
    if thumbs is not None:
        thumbs = f'<div class="strip">{thumbs}{_box_overlays(clip, preview)}</div>'
        n_thumbs, missing = 1, False
    else:
        why = ("curated before previews were stored (curate it again to get one)" if not preview
               else f"the stored preview is not a JPEG ({len(preview)} bytes)")
        thumbs = (f'<div class="missing" style="min-height: {opts.thumb_height}px">no preview: {_e(why)}</div>')
        n_thumbs, missing = 0, True
    scores = " · ".join(f"{label} {_fmt(clip.get(col), pattern)}" for col, label, pattern in CARD_SCORES
                        if not (clip.get("is_image") and col in ("motion_mean", "duration", "overlay_score")))
    reasons = [*(clip.get("reject_reasons") or []), *(clip.get("failed_thresholds") or [])]
    badges = "".join(f'<span class="reason">{_e(r)}</span>' for r in reasons)
    span = ("image" if clip.get("is_image") else
            f"{_fmt(clip.get('start_s'), '{:.2f}')}–{_fmt(clip.get('end_s'), '{:.2f}')} s, "
            f"frames {clip.get('start_frame')}–{clip.get('end_frame')}")
    name = Path(str(video.get("uri", ""))).name
    return (f'<div class="card {"kept" if kept else "rejected"}"><div class="thumbs">{thumbs}</div>'
            f'<div class="clip-id">{_e(clip["clip_id"])}</div>'
            f'<div class="meta">{_e(name)} · {_e(span)} · {clip.get("width")}×{clip.get("height")}</div>'
            f'<div class="caption">{_e(clip.get("caption") or "(no caption)")}</div>'
            f'<div class="scores">{_e(scores)}</div><div>{badges}</div></div>', n_thumbs, missing)


def render(con: duckdb.DuckDBPyConnection, db_label: str, opts: ReportOptions) -> tuple[str, int, int]:
    """The report page for an open catalog; returns (html, previews embedded, previews missing)."""
    out: list[str] = []
    thresholds = _rows(con, "SELECT name, value, comment FROM thresholds ORDER BY name")
    values = {t["name"]: t["value"] for t in thresholds}
    runs = _run_counts(con)
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    out.append(f"<h1>Catalog report</h1><div class='meta'>{_e(db_label)} · generated {generated} · "
               f"{len(runs)} run(s)</div>")

    # Counts per stage.
    n_inputs_failed = _scalar(con, "SELECT count(*) FROM rejects")
    # Catalogs written before the skipped table existed have none (a read-only report cannot add it).
    has_skipped = bool(_scalar(con, "SELECT count(*) FROM duckdb_tables() WHERE table_name = 'skipped' "
                                    "AND schema_name = 'main'"))
    skipped = con.execute("SELECT reason, count(*) AS n FROM skipped GROUP BY reason ORDER BY n DESC, reason"
                          ).fetchall() if has_skipped else []
    funnel = [
        ("videos and images (current)", _scalar(con, "SELECT count(*) FROM videos")),
        ("inputs that failed (rejects, all runs)", n_inputs_failed),
        ("entries skipped, not media (skipped, all runs)", sum(n for _, n in skipped)),
        ("clips (current)", _scalar(con, "SELECT count(*) FROM clips")),
        ("clips with no curation reject reason",
         _scalar(con, "SELECT count(*) FROM clips WHERE len(reject_reasons) = 0")),
        ("kept_clips (pass every threshold)", _scalar(con, "SELECT count(*) FROM kept_clips")),
        ("clips scored by stand-in models (model thresholds not applied)",
         _scalar(con, "SELECT count(*) FROM clip_verdicts WHERE standin_models")),
        ("clips in shards", _scalar(con, "SELECT count(DISTINCT clip_id) FROM shard_samples")),
    ]
    out.append("<h2>Counts per stage</h2>")
    out.append(_table(["stage", "count"], funnel, cls="funnel"))
    if runs:
        keys = list(dict.fromkeys(k for r in runs for k in r["counts"]))
        out.append("<p class='note'>Counters each run recorded (runs.counts, latest attempt):</p>")
        out.append(_table(["run_id", "attempts", "started", "wall s", "input", "stand-in models", *keys],
                          [[r["run_id"], r["attempts"], _fmt(r["started_at"]), _fmt(r["wall_seconds"], "{:.1f}"),
                            r["input"], r["standin"], *[_fmt(r["counts"].get(k)) for k in keys]] for r in runs]))

    # Reasons.
    out.append("<h2>Reject reasons</h2>")
    curation = con.execute("SELECT reason, count(*) AS n FROM (SELECT unnest(reject_reasons) AS reason FROM clips) "
                           "GROUP BY reason ORDER BY n DESC, reason").fetchall()
    out.append("<p class='note'>Curation-time reasons (clips.reject_reasons; these clips stay out whatever the "
               "thresholds):</p>")
    out.append(_table(["reason", "clips"], curation) if curation else "<p>none</p>")
    failing = dict(con.execute(
        "SELECT name, count(*) FROM (SELECT unnest(failed_thresholds) AS name FROM clip_verdicts "
        "WHERE len(reject_reasons) = 0) GROUP BY name").fetchall())
    alone = dict(con.execute(
        "SELECT failed_thresholds[1], count(*) FROM clip_verdicts WHERE len(reject_reasons) = 0 "
        "AND len(failed_thresholds) = 1 GROUP BY 1").fetchall())
    out.append("<p class='note'>Thresholds (edit with <code>python -m catalog set-threshold DB NAME VALUE</code>). "
               "<b>fails</b>: clips without a curation reason that fail it; <b>only this</b>: clips that would be "
               "kept if this threshold alone were switched off.</p>")
    out.append(_table(["threshold", "value", "fails", "only this", "meaning"],
                      [[t["name"], "off" if t["value"] is None else _fmt(t["value"], "{:g}"),
                        failing.get(t["name"], 0), alone.get(t["name"], 0), t["comment"]] for t in thresholds]))
    stage_rejects = con.execute("SELECT stage, error_class, count(*) AS n, any_value(message) FROM rejects "
                                "GROUP BY ALL ORDER BY n DESC").fetchall()
    out.append("<p class='note'>Inputs that could not be processed (rejects):</p>")
    out.append(_table(["stage", "error", "inputs", "example message"], stage_rejects) if stage_rejects
               else "<p>none</p>")
    out.append("<p class='note'>Directory entries under the input that are not media to curate (skipped):</p>")
    out.append(_table(["reason", "entries"], skipped) if skipped else "<p>none</p>")

    # Histograms.
    out.append("<h2>Score histograms</h2><p class='note'>Green bars pass the thresholds marked on the score, red "
               "bars fail them. Clips with curation reject reasons are included; images are left out of motion, "
               "overlay and duration, which do not apply to them.</p>")
    n_standin = _scalar(con, "SELECT count(*) FROM clip_verdicts WHERE standin_models")
    if n_standin:
        models = ", ".join(r.column for r in db.THRESHOLD_RULES if r.model)
        out.append(f"<p class='note'><b>{n_standin:,} clips were scored by tiny random stand-in models</b>: their "
                   f"{_e(models)} are meaningless and the thresholds on them are not applied to these clips, "
                   "whatever the colour of their bars.</p>")
    out.append("<div class='hists'>")
    temporal_cols = {r.column for r in db.THRESHOLD_RULES if r.temporal}
    for col in SCORE_COLUMNS:
        where = "WHERE NOT coalesce(is_image, false)" if col in temporal_cols else ""
        arr = con.execute(f"SELECT {col}::DOUBLE AS v FROM clips {where}").to_arrow_table().column("v")
        nulls = arr.null_count
        vals = arr.drop_null().to_numpy() if len(arr) else np.array([])
        limits = [(r.name, r.op, values[r.name]) for r in db.THRESHOLD_RULES
                  if r.column == col and values.get(r.name) is not None]
        out.append(histogram_svg(vals, limits, title=col, bins=opts.bins, nulls=nulls))
    out.append("</div>")

    # Contact sheets.
    n_thumbs = n_missing = 0
    for kept in (True, False):
        clips = _sheet_clips(con, kept, opts.clips_per_sheet)
        if kept:
            out.append("<h2>Kept clips</h2><p class='note'>Spread over kept_clips from the lowest aesthetic score "
                       "up: the first cards are the borderline ones. Outlines on the frames: orange, text that stays "
                       "in place (OCR, text_persistent_box); magenta, text read in a corner (OCR, text_mark_box); blue, a static "
                       "overlay (overlay_box).</p>")
        else:
            out.append("<h2>Rejected clips</h2><p class='note'>Examples of every reason in turn; red badges are the "
                       "curation reasons and the thresholds each clip fails.</p>")
        cards = []
        for clip in clips:
            card, t, missing = _card(clip, kept, opts)
            cards.append(card)
            n_thumbs += t
            n_missing += missing
        out.append(f"<div class='sheet'>{''.join(cards)}</div>" if cards else "<p>none</p>")

    # Buckets.
    out.append("<h2>Buckets</h2>")
    buckets = con.execute("""
        SELECT bucket, any_value(frames), any_value(height), any_value(width), any_value(fps), count(*) AS shards,
               sum(num_samples) AS samples, sum(bytes) AS bytes
        FROM shards GROUP BY bucket ORDER BY any_value(frames), any_value(height) * any_value(width)""").fetchall()
    if buckets:
        out.append(_table(["bucket", "frames", "height", "width", "fps", "shards", "samples", "MB"],
                          [[*b[:7], f"{(b[7] or 0) / 1e6:.1f}"] for b in buckets]))
    else:
        out.append("<p>No shards yet (<code>python -m jobs.shards --catalog DB --output OUT/shards</code>).</p>")

    page = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>Catalog report</title>"
            f"<style>{CSS}</style><script>{SCRIPT}</script></head><body>{''.join(out)}</body></html>")
    return page, n_thumbs, n_missing


def write_report(db_path: str | Path, output: str | Path, options: ReportOptions | None = None) -> ReportSummary:
    """Write the report for the catalog at ``db_path`` to ``output`` (one self-contained HTML file)."""
    opts = options or ReportOptions()
    con = db.open_catalog(db_path, read_only=True)
    try:
        page, n_thumbs, n_missing = render(con, str(db_path), opts)
    finally:
        con.close()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(output)
    return ReportSummary(output, output.stat().st_size, n_thumbs, n_missing)
