"""A one-file HTML report of OUTPUT: what ran, what the model saw, where it is least sure.

One streamed pass over the rows (projected columns, no masks) gathers the statistics and
keeps the `limit` least confident rows in a bounded heap; a second, filtered pass reads
only those rows' masks. Thumbnails (long side `THUMB_SIDE`) are inlined as data: URIs and
charts are inline SVG, so the file opens anywhere, offline, with no external script.
"""
from __future__ import annotations

import base64
import heapq
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from html import escape
from pathlib import Path

import numpy as np
import pyarrow.compute as pc

from pipeline.store.output import OutputMetadata, decode_mask, error_reason
from pipeline.store.reader import iter_batches, read_metadata, read_runs, select_identity
from pipeline.tools.export import atomic_text, colourise

THUMB_SIDE = 256
HIST_BINS = 20
MAX_ERROR_ROWS = 100
MAX_CHART_CLASSES = 40
OVERLAY_ALPHA = 0.5


@dataclass
class Stats:
    """What one pass over a model identity's rows gathers; memory independent of rows."""

    num_classes: int
    limit: int
    rows: int = 0
    ok: int = 0
    errors: int = 0
    confidence_sum: float = 0.0
    fraction_sum: np.ndarray = field(init=False)
    images_with_class: np.ndarray = field(init=False)
    confidence_hist: np.ndarray = field(init=False)
    lowest: list = field(default_factory=list)  # heap of (-confidence, image_id, uri)
    error_rows: list = field(default_factory=list)
    error_reasons: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self.fraction_sum = np.zeros(self.num_classes, np.float64)
        self.images_with_class = np.zeros(self.num_classes, np.int64)
        self.confidence_hist = np.zeros(HIST_BINS, np.int64)

    def add(self, batch) -> None:
        self.rows += batch.num_rows
        is_ok = pc.equal(batch.column("status"), "ok")
        ok = batch.filter(is_ok)
        bad = batch.filter(pc.invert(is_ok))
        self.ok += ok.num_rows
        self.errors += bad.num_rows
        if ok.num_rows:
            fractions = ok.column("class_fraction").flatten().to_numpy(zero_copy_only=False)
            fractions = fractions.reshape(ok.num_rows, self.num_classes)
            self.fraction_sum += fractions.sum(0)
            self.images_with_class += (fractions > 0).sum(0)
            conf = ok.column("confidence").to_numpy(zero_copy_only=False).astype(np.float64)
            self.confidence_hist += np.histogram(conf, bins=HIST_BINS, range=(0.0, 1.0))[0]
            self.confidence_sum += float(conf.sum())
            self._keep_lowest(conf, ok)
        for image_id, uri, error in zip(bad.column("image_id").to_pylist(),
                                        bad.column("uri").to_pylist(),
                                        bad.column("error").to_pylist()):
            error = error or "(no message)"
            # Group by the reason without the file name or the byte counts.
            self.error_reasons[error_reason(error)] += 1
            if len(self.error_rows) < MAX_ERROR_ROWS:
                self.error_rows.append((image_id, uri, error))

    def _keep_lowest(self, conf: np.ndarray, ok) -> None:
        if self.limit <= 0:
            return
        candidates = np.arange(len(conf))
        if len(self.lowest) >= self.limit:  # only rows below the current N-th lowest matter
            candidates = np.flatnonzero(conf < -self.lowest[0][0])
            if not len(candidates):
                return
        taken = ok.take(candidates)
        for c, image_id, uri in zip(conf[candidates].tolist(), taken.column("image_id").to_pylist(),
                                    taken.column("uri").to_pylist()):
            item = (-c, image_id, uri)
            if len(self.lowest) < self.limit:
                heapq.heappush(self.lowest, item)
            else:
                heapq.heappushpop(self.lowest, item)

    def least_confident(self) -> list[tuple[float, str, str]]:
        """(confidence, image_id, uri), least confident first."""
        return sorted(((-c, i, u) for c, i, u in self.lowest), key=lambda t: (t[0], t[1]))


def gather(output: str, meta: OutputMetadata, limit: int) -> Stats:
    stats = Stats(num_classes=meta.num_classes, limit=limit)
    for batch in iter_batches(output, meta, ["image_id", "uri", "status", "error",
                                             "class_fraction", "confidence"], batch_size=4096):
        stats.add(batch)
    return stats


# -- gallery ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class GalleryItem:
    image_id: str
    confidence: float
    top_classes: list[tuple[str, float]]
    image_uri: str          # data: URI of the source thumbnail (or of the mask when unreadable)
    overlay_uri: str        # data: URI of the coloured mask over the source
    note: str | None = None


MAX_THUMB_BYTES = 30 * 1024
"""What one gallery picture may weigh at THUMB_SIDE: a PNG blend of a photo is 120-145 KB
(50 of them made a 7.7 MB page); WebP q80 of the same is 7-8 KB, JPEG q85 12-14 KB."""

_ENCODINGS = {  # extension -> (MIME type, OpenCV parameters)
    ".jpg": ("image/jpeg", lambda cv2: [cv2.IMWRITE_JPEG_QUALITY, 85]),
    ".webp": ("image/webp", lambda cv2: [cv2.IMWRITE_WEBP_QUALITY, 80]),
    ".png": ("image/png", lambda cv2: [cv2.IMWRITE_PNG_COMPRESSION, 6]),
}


def data_uri(rgb: np.ndarray, fmt: str = ".jpg") -> str:
    """A data: URI of an RGB picture: JPEG for photos, WebP for overlays (photo blends),
    PNG only for flat colour masks, where it is both exact and small."""
    import cv2

    mime, params = _ENCODINGS[fmt]
    ok, buf = cv2.imencode(fmt, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params(cv2))
    if not ok:  # pragma: no cover
        raise ValueError("thumbnail could not be encoded")
    return f"data:{mime};base64,{base64.b64encode(buf.tobytes()).decode('ascii')}"


def thumbnail_size(height: int, width: int, side: int = THUMB_SIDE) -> tuple[int, int]:
    scale = min(1.0, side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def gallery_item(image_id: str, uri: str, confidence: float, mask: np.ndarray,
                 meta: OutputMetadata) -> GalleryItem:
    """Source thumbnail and coloured-mask overlay for one row. A source that cannot be read
    any more is replaced by the coloured mask alone, with the reason as a note."""
    import cv2

    from pipeline.store.decode import decode_image, resize_mask
    from pipeline.store.sources import read_bytes

    height, width = thumbnail_size(*mask.shape)
    small_mask = resize_mask(mask, height, width)
    colours = colourise(small_mask, meta)
    note = None
    try:
        rgb = decode_image(read_bytes(uri, retries=1), image_id)
        rgb = cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA)
        overlay = (rgb * (1 - OVERLAY_ALPHA) + colours * OVERLAY_ALPHA).astype(np.uint8)
        image_uri, overlay_uri = data_uri(rgb), data_uri(overlay, ".webp")
    except (OSError, ValueError) as exc:
        note = f"source not shown: {str(exc).splitlines()[0]}"
        image_uri = overlay_uri = data_uri(colours, ".png")
    counts = np.bincount(mask.ravel(), minlength=meta.num_classes)[:meta.num_classes] / mask.size
    top = [(meta.classes[i], float(counts[i])) for i in np.argsort(-counts)[:3] if counts[i] > 0]
    return GalleryItem(image_id, confidence, top, image_uri, overlay_uri, note)


def gallery(output: str, meta: OutputMetadata, stats: Stats) -> list[GalleryItem]:
    chosen = stats.least_confident()
    if not chosen:
        return []
    ids = [image_id for _, image_id, _ in chosen]
    masks: dict[str, np.ndarray] = {}
    for batch in iter_batches(output, meta, ["image_id", "mask"],
                              where=pc.field("image_id").isin(ids) & (pc.field("status") == "ok")):
        for image_id, cell in zip(batch.column("image_id").to_pylist(), batch.column("mask").to_pylist()):
            masks[image_id] = decode_mask(cell)
    return [gallery_item(image_id, uri, conf, masks[image_id], meta)
            for conf, image_id, uri in chosen if image_id in masks]


# -- charts ----------------------------------------------------------------------------------
def _hex(rgb) -> str:
    r, g, b = (int(v) for v in rgb)
    return f"#{r:02x}{g:02x}{b:02x}"


def class_chart_svg(meta: OutputMetadata, stats: Stats) -> str:
    """Per class, two bars: mean class fraction (palette colour) and share of images
    containing the class (grey); classes by mean fraction, largest first."""
    if not stats.ok:
        return "<p>No labelled images.</p>"
    mean = stats.fraction_sum / stats.ok
    share = stats.images_with_class / stats.ok
    order = np.argsort(-mean, kind="stable")[:MAX_CHART_CLASSES]
    label_w, bar_w, row_h, top = 170, 560, 30, 28
    width, height = label_w + bar_w + 80, top + row_h * len(order) + 10
    parts = [f'<svg class="chart" id="class-chart" xmlns="http://www.w3.org/2000/svg" '
             f'width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
             f'aria-label="class frequency">',
             f'<rect x="{label_w}" y="6" width="12" height="10" fill="#4c78a8"/>'
             f'<text x="{label_w + 16}" y="15">mean class fraction</text>'
             f'<rect x="{label_w + 170}" y="6" width="12" height="10" fill="#b0b0b0"/>'
             f'<text x="{label_w + 186}" y="15">share of images containing the class</text>']
    for k, c in enumerate(order):
        y = top + k * row_h
        colour = _hex(meta.palette[c]) if c < len(meta.palette) else "#4c78a8"
        parts.append(
            f'<text x="{label_w - 8}" y="{y + 15}" text-anchor="end">{escape(meta.classes[c])}</text>'
            f'<rect x="{label_w}" y="{y + 2}" width="{max(mean[c] * bar_w, 0.5):.1f}" height="11" '
            f'fill="{colour}" stroke="#333" stroke-width="0.5"><title>{escape(meta.classes[c])}: '
            f'mean fraction {mean[c]:.2%}</title></rect>'
            f'<text x="{label_w + mean[c] * bar_w + 4:.1f}" y="{y + 12}" class="num">{mean[c]:.1%}</text>'
            f'<rect x="{label_w}" y="{y + 15}" width="{max(share[c] * bar_w, 0.5):.1f}" height="9" '
            f'fill="#b0b0b0"><title>{escape(meta.classes[c])}: in {share[c]:.1%} of images</title></rect>'
            f'<text x="{label_w + share[c] * bar_w + 4:.1f}" y="{y + 24}" class="num">{share[c]:.0%}</text>')
    parts.append("</svg>")
    if meta.num_classes > MAX_CHART_CLASSES:
        parts.append(f"<p>The {MAX_CHART_CLASSES} classes with the largest mean fraction of "
                     f"{meta.num_classes}.</p>")
    return "".join(parts)


def confidence_histogram_svg(stats: Stats) -> str:
    if not stats.ok:
        return "<p>No labelled images.</p>"
    left, plot_w, plot_h, top = 50, 600, 200, 10
    width, height = left + plot_w + 20, top + plot_h + 40
    peak = max(int(stats.confidence_hist.max()), 1)
    bin_w = plot_w / HIST_BINS
    parts = [f'<svg class="chart" id="confidence-histogram" xmlns="http://www.w3.org/2000/svg" '
             f'width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
             f'aria-label="confidence histogram">',
             f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="#333"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="#333"/>',
             f'<text x="{left - 6}" y="{top + 10}" text-anchor="end">{peak}</text>',
             f'<text x="{left - 6}" y="{top + plot_h}" text-anchor="end">0</text>']
    for k, count in enumerate(stats.confidence_hist.tolist()):
        h = plot_h * count / peak
        lo, hi = k / HIST_BINS, (k + 1) / HIST_BINS
        parts.append(f'<rect x="{left + k * bin_w + 1:.1f}" y="{top + plot_h - h:.1f}" '
                     f'width="{bin_w - 2:.1f}" height="{h:.1f}" fill="#4c78a8">'
                     f'<title>{lo:.2f}-{hi:.2f}: {count} images</title></rect>')
    for k in range(0, HIST_BINS + 1, 4):
        x = left + k * bin_w
        parts.append(f'<text x="{x:.1f}" y="{top + plot_h + 16}" text-anchor="middle">{k / HIST_BINS:.1f}</text>')
    parts.append(f'<text x="{left + plot_w / 2}" y="{top + plot_h + 34}" text-anchor="middle">'
                 "confidence (mean top softmax probability per image)</text></svg>")
    return "".join(parts)


# -- the page --------------------------------------------------------------------------------
CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; background: #fff; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 28px; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 8px 0; } td, th { border: 1px solid #ddd; padding: 3px 8px;
text-align: left; vertical-align: top; } th { background: #f4f4f4; }
.num { font-variant-numeric: tabular-nums; font-size: 11px; }
svg text { font: 12px system-ui, sans-serif; fill: #222; }
.legend span { display: inline-block; margin: 2px 10px 2px 0; }
.swatch { display: inline-block; width: 12px; height: 12px; border: 1px solid #333; vertical-align: middle; }
.gallery { display: flex; flex-wrap: wrap; gap: 14px; }
.card { border: 1px solid #ddd; padding: 6px; width: 530px; }
.card img { height: 180px; width: auto; max-width: 256px; object-fit: contain;
image-rendering: pixelated; margin: 4px 4px 0 0; background: #eee; }
.card .id { font-family: monospace; word-break: break-all; }
img.broken { outline: 3px solid red; }
.note { color: #a40; }
code { background: #f4f4f4; padding: 0 3px; }
"""

SCRIPT = """
window.addEventListener('load', function () {
  var images = document.querySelectorAll('img.gallery-image');
  var loaded = 0;
  images.forEach(function (img) {
    if (img.complete && img.naturalWidth > 0) { loaded++; } else { img.classList.add('broken'); }
  });
  document.body.setAttribute('data-images-loaded', loaded + '/' + images.length);
});
"""


def _figure(value) -> str:
    """A run record's rate as the run printed it (one decimal); blank when it has none."""
    return f"{value:.1f}" if isinstance(value, (int, float)) else ""


def _table(headers: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{escape(str(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def comparison_html(comparison) -> str:
    """The section `report --compare-to` adds (a `pipeline.tools.compare.CompareResult`)."""
    if comparison is None:
        return ""
    c = comparison
    rows = [[m.image_id, f"{m.pixel_agreement:.4f}", f"{m.mask_iou:.4f}"] for m in c.most_changed]
    return (f'<h2 id="compare">Compared with another model</h2>'
            f"<p>This model (A) against {escape(c.b.model)} (weights "
            f"<code>{escape(c.b.weights_sha256[:12])}</code>, B) on the {c.images} images both "
            f"labelled ({c.only_a} only in A, {c.only_b} only in B): pixel agreement "
            f"<b>{c.pixel_agreement:.4f}</b>, mean IoU between their masks <b>{c.mask_iou:.4f}</b>.</p>"
            f"<p>The {len(rows)} images that changed most:</p>"
            + _table(["image_id", "pixel agreement", "mask IoU"], rows))


def render(output: str, meta: OutputMetadata, stats: Stats, items: list[GalleryItem],
           runs: list[dict], others: list[OutputMetadata], comparison=None) -> str:
    mean_conf = stats.confidence_sum / stats.ok if stats.ok else float("nan")
    identity = _table(["", ""], [
        ["model", meta.model], ["weights", meta.weights or "(random init)"],
        ["weights sha256", meta.weights_sha256], ["classes", f"{meta.num_classes}"],
        ["input mean / std", f"{list(meta.mean)} / {list(meta.std)}"],
        ["rows", stats.rows], ["ok", stats.ok], ["errors", stats.errors],
        ["mean confidence", f"{mean_conf:.3f}"]])
    run_rows = []
    for r in runs:
        counts, timings = r.get("counts", {}), r.get("timings", {})
        run_rows.append([r.get("run_id", ""), r.get("state", ""), timings.get("started_at", ""),
                         (r.get("model") or {}).get("arch", ""),
                         ((r.get("model") or {}).get("weights_sha256") or "")[:12],
                         counts.get("ok", 0), counts.get("errors", 0), counts.get("skipped_existing", 0),
                         timings.get("wall_s", ""), _figure(timings.get("images_per_s"))])
    runs_html = _table(["run", "state", "started", "model", "weights", "ok", "errors",
                        "already labelled", "wall s", "images/s"], run_rows) if run_rows else "<p>No run records.</p>"
    other_html = ""
    if others:
        held = ", ".join(f"{m.model} ({m.weights_sha256[:12]})" for m in others)
        other_html = (f"<p>OUTPUT also holds rows of {escape(held)}: choose with "
                      "<code>--model</code> / <code>--weights-sha256</code>.</p>")
    legend = "".join(f'<span><i class="swatch" style="background:{_hex(c)}"></i> {escape(n)}</span>'
                     for n, c in zip(meta.classes, meta.palette))
    cards = []
    for item in items:
        top = ", ".join(f"{escape(n)} {v:.0%}" for n, v in item.top_classes)
        note = f'<div class="note">{escape(item.note)}</div>' if item.note else ""
        cards.append(
            f'<div class="card"><div class="id">{escape(item.image_id)}</div>'
            f'<div>confidence <b>{item.confidence:.3f}</b> &middot; {top}</div>{note}'
            f'<img class="gallery-image" alt="image {escape(item.image_id)}" src="{item.image_uri}">'
            f'<img class="gallery-image" alt="mask {escape(item.image_id)}" src="{item.overlay_uri}"></div>')
    gallery_html = (f'<div class="gallery">{"".join(cards)}</div>' if cards
                    else "<p>No labelled images.</p>")
    reasons = _table(["count", "reason"], [[c, r] for r, c in stats.error_reasons.most_common(20)])
    error_rows = _table(["image_id", "uri", "error"], [list(e) for e in stats.error_rows])
    more = (f"<p>First {len(stats.error_rows)} of {stats.errors} error rows.</p>"
            if stats.errors > len(stats.error_rows) else "")
    errors_html = (f"{reasons}{error_rows}{more}" if stats.errors else "<p>No errors.</p>")
    generated = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>drn-label report: {escape(output)}</title>
<style>{CSS}</style>
<script>{SCRIPT}</script>
</head>
<body data-images-loaded="pending" data-gallery-items="{len(items)}">
<h1>drn-label report</h1>
<p><code>{escape(output)}</code> &middot; generated {generated}</p>
<h2 id="summary">Summary and model</h2>
{identity}{other_html}
<h3>Runs</h3>
{runs_html}
<h2 id="classes">Class frequency</h2>
{class_chart_svg(meta, stats)}
<h2 id="confidence">Confidence</h2>
{confidence_histogram_svg(stats)}
<h2 id="gallery">Least confident images</h2>
<p>The {len(items)} least confident of {stats.ok} images, least confident first: source | mask over source.</p>
<div class="legend">{legend}</div>
{gallery_html}
{comparison_html(comparison)}
<h2 id="errors">Errors ({stats.errors})</h2>
{errors_html}
</body></html>
"""


@dataclass(frozen=True)
class ReportResult:
    path: str
    rows: int
    ok: int
    errors: int
    gallery: int


def write_report(output: str, html_path: Path, *, limit: int = 50, model: str | None = None,
                 weights_sha256: str | None = None, compare_to: str | None = None) -> ReportResult:
    """Write the HTML report of OUTPUT (one model identity) to `html_path`; `compare_to`
    (an identity as `drn-label compare` takes it) adds the comparison section."""

    meta = select_identity(output, model=model, weights_sha256=weights_sha256)
    stats = gather(output, meta, limit)
    items = gallery(output, meta, stats)
    others = [m for m in {(m.model, m.weights_sha256): m for m in read_metadata(output)}.values()
              if (m.model, m.weights_sha256) != (meta.model, meta.weights_sha256)]
    comparison = None
    if compare_to is not None:
        from pipeline.tools.compare import compare

        comparison = compare(output, f"{meta.model}@{meta.weights_sha256}", compare_to, top=limit)
    page = render(output, meta, stats, items, read_runs(output), others, comparison)
    with atomic_text(Path(html_path)) as f:
        f.write(page)
    return ReportResult(str(html_path), stats.rows, stats.ok, stats.errors, len(items))
