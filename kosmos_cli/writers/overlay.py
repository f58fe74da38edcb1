"""Overlays: a page image with its OCR polygons or its labelled grounding boxes drawn."""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

from ..results import PageResult

__all__ = ["draw_overlay"]

_PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
            (70, 240, 240), (240, 50, 230), (128, 128, 0), (0, 128, 128), (170, 110, 40)]


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except Exception:  # Pillow without FreeType
        return ImageFont.load_default()


def draw_overlay(image: Image.Image, result: PageResult | dict) -> Image.Image:
    """A copy of the page with the OCR polygons, or the grounding boxes labelled with their phrase.

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
    for i, line in enumerate(d.get("lines") or []):
        poly = line.get("polygon") if isinstance(line, dict) else None
        if not poly or len(poly) < 8:
            continue
        pts = [(poly[k] * sx, poly[k + 1] * sy) for k in range(0, len(poly) - 1, 2)]
        draw.polygon(pts, outline=_PALETTE[i % 3], width=lw)
    font = _font(max(12, round(max(w, h) / 60)))
    for i, ent in enumerate(d.get("entities") or []):
        color = _PALETTE[i % len(_PALETTE)]
        for box in ent.get("boxes") or []:
            x0, y0, x1, y1 = (float(v) for v in box[:4])
            if max(x0, y0, x1, y1) <= 1.0:  # normalised
                x0, x1, y0, y1 = x0 * w, x1 * w, y0 * h, y1 * h
            else:
                x0, x1, y0, y1 = x0 * sx, x1 * sx, y0 * sy, y1 * sy
            draw.rectangle([x0, y0, x1, y1], outline=color, width=lw)
            label = str(ent.get("text", ""))
            if label:
                l, t, r, b = draw.textbbox((0, 0), label, font=font)
                tw, th = r - l + 2 * lw, b - t + 2 * lw
                ty = y0 - th if y0 - th >= 0 else y0  # above the box, or inside at the top edge
                draw.rectangle([x0, ty, x0 + tw, ty + th], fill=color)
                draw.text((x0 + lw - l, ty + lw - t), label, fill=(255, 255, 255), font=font)
    return im
