"""Overlays: a page image with its OCR polygons or its labelled grounding boxes drawn, each in the
colour of its confidence, with a legend of the colours in the top-right corner."""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

from ..results import PageResult
from .markup import probability

__all__ = ["CONFIDENCE_BINS", "UNKNOWN", "confidence_colour", "draw_overlay"]

# Confidence bins, surest first: (lowest confidence in the bin, RGB, legend label). The colours are
# four of Okabe & Ito's colour-blind-safe set, ordered cool (sure) to warm (doubtful): blue, sky
# blue, orange, vermillion. The blue-to-yellow axis that all common colour-vision deficiencies keep
# separates the sure half from the doubtful one, lightness separates the two steps within each half,
# and all four are saturated enough to show on white paper and on photos. The bounds suit a
# geometric mean of token probabilities (a ranking for review): text the model read well sits above
# 0.95, so the warm colours mark what is worth a look.
CONFIDENCE_BINS: tuple[tuple[float, tuple[int, int, int], str], ...] = (
    (0.95, (0, 114, 178), "0.95-1"),
    (0.80, (86, 180, 233), "0.80-0.95"),
    (0.50, (230, 159, 0), "0.50-0.80"),
    (0.0, (213, 94, 0), "0-0.50"),
)
UNKNOWN = (128, 128, 128)  # a neutral grey, no hue, for no confidence (older records, failed scoring)


def confidence_colour(value: object) -> tuple[int, int, int]:
    """The colour of a confidence's bin; `UNKNOWN` for None or anything not a number in [0, 1]."""
    value = probability(value)
    if value is None:
        return UNKNOWN
    return next(colour for low, colour, _ in CONFIDENCE_BINS if value >= low)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except Exception:  # Pillow without FreeType
        return ImageFont.load_default()


def _ink(fill: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black or white, whichever contrasts more with ``fill`` (WCAG relative luminance)."""
    c = [v / 255 for v in fill]
    lum = sum(k * (v / 12.92 if v <= 0.04045 else ((v + 0.055) / 1.055) ** 2.4)
              for k, v in zip((0.2126, 0.7152, 0.0722), c))
    return (0, 0, 0) if (lum + 0.05) / 0.05 > 1.05 / (lum + 0.05) else (255, 255, 255)


def draw_overlay(image: Image.Image, result: PageResult | dict) -> Image.Image:
    """A copy of the page with the OCR polygons, or the grounding boxes labelled with their phrase,
    each coloured by its confidence (`confidence_colour`), and a legend of the colours when anything
    was drawn.

    Coordinates are scaled from the result's width/height to the image if they differ; grounding
    boxes may be normalised (0–1) or in pixels.
    """
    d = result.to_dict() if isinstance(result, PageResult) else result
    im = image.convert("RGB") if image.mode != "RGB" else image.copy()
    w, h = im.size
    sx = w / d["width"] if d.get("width") else 1.0
    sy = h / d["height"] if d.get("height") else 1.0
    lw = max(2, round(max(w, h) / 600))
    draw = ImageDraw.Draw(im)
    drawn = False
    for line in d.get("lines") or []:
        poly = line.get("polygon") if isinstance(line, dict) else None
        if not poly or len(poly) < 8:
            continue
        pts = [(poly[k] * sx, poly[k + 1] * sy) for k in range(0, len(poly) - 1, 2)]
        draw.polygon(pts, outline=confidence_colour(line.get("confidence")), width=lw)
        drawn = True
    font = _font(max(12, round(max(w, h) / 60)))
    for ent in d.get("entities") or []:
        color = confidence_colour(ent.get("confidence"))
        for box in ent.get("boxes") or []:
            x0, y0, x1, y1 = (float(v) for v in box[:4])
            if max(x0, y0, x1, y1) <= 1.0:  # normalised
                x0, x1, y0, y1 = x0 * w, x1 * w, y0 * h, y1 * h
            else:
                x0, x1, y0, y1 = x0 * sx, x1 * sx, y0 * sy, y1 * sy
            draw.rectangle([x0, y0, x1, y1], outline=color, width=lw)
            drawn = True
            label = str(ent.get("text", ""))
            if label:
                l, t, r, b = draw.textbbox((0, 0), label, font=font)
                tw, th = r - l + 2 * lw, b - t + 2 * lw
                ty = y0 - th if y0 - th >= 0 else y0  # above the box, or inside at the top edge
                draw.rectangle([x0, ty, x0 + tw, ty + th], fill=color)
                draw.text((x0 + lw - l, ty + lw - t), label, fill=_ink(color), font=font)
    if drawn:
        _legend(draw, w, h, lw)
    return im


def _legend(draw: ImageDraw.ImageDraw, w: int, h: int, lw: int) -> None:
    """The bins' colours and ranges, and unknown's grey, on a white panel in the top-right corner.
    Its text is sized to the page like the labels (smaller: it is read once, not per box); where the
    panel would take more than half the page's width or height it is left out."""
    font = _font(max(10, round(max(w, h) / 90)))
    rows = [("confidence", None), *((label, colour) for _, colour, label in CONFIDENCE_BINS), ("unknown", UNKNOWN)]
    boxes = [draw.textbbox((0, 0), text, font=font) for text, _ in rows]
    size = max(b - t for _, t, _, b in boxes)  # a row's height, and a swatch's side
    pad = max(2, size // 3)
    width = 3 * pad + size + max(r - l for l, _, r, _ in boxes)
    height = pad + len(rows) * (size + pad)
    if width > w / 2 or height > h / 2:
        return
    x0, y0 = w - width - pad, pad
    draw.rectangle([x0, y0, x0 + width, y0 + height], fill=(255, 255, 255), outline=(0, 0, 0), width=max(1, lw // 2))
    for k, ((text, colour), (l, t, _, _)) in enumerate(zip(rows, boxes)):
        y = y0 + pad + k * (size + pad)
        tx = x0 + pad
        if colour is not None:  # the title row has no swatch
            draw.rectangle([tx, y, tx + size, y + size], fill=colour)
            tx += size + pad
        draw.text((tx - l, y - t), text, fill=(0, 0, 0), font=font)
