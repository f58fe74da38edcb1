"""Peak host memory of reading pages: big scans, high --dpi PDFs and a folder of 200 pages.

    python benchmarks/render_memory.py --dir /tmp/render-memory
    python benchmarks/render_memory.py --dir /tmp/render-memory --cases png-1bit,pdf-1200dpi-1

Writes the inputs once into ``--dir`` (about 0.3 GB of files, no download), then runs each case in a
fresh process: every page goes through `iter_pages` and `prefetch` (depth 16, the CLI's look-ahead at
the default batch size) and is preprocessed for Kosmos-2.5 (`kosmos2_5_patches`, 4096 patches), one
page after the other; no model is loaded. Reports the process's peak resident memory (VmHWM; getrusage's
ru_maxrss would include the parent's peak, which Linux carries over fork and exec) and the time taken.
It measures the kosmos_cli of the current directory: run it from the root of the checkout to measure.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image, ImageDraw

SIDE = 17_000  # 289 MP: the largest square page under MAX_PIXELS (300 MP)

MEASURE = """
import json, re, sys, time
from kosmos_cli.inputs import collect_inputs
from kosmos_cli.pages import iter_pages, prefetch
from kosmos_cli.processing.images import kosmos2_5_patches
dpi, inputs = float(sys.argv[1]), sys.argv[2:]
files, errors = collect_inputs(inputs)
assert files and not [e for e in errors if not getattr(e, "warning", False)], errors
started, pages, largest = time.perf_counter(), 0, (0, 0)
for job in prefetch(iter_pages(files, dpi=dpi), depth=16):
    if getattr(job, "image", None) is None:
        sys.exit(f"page failed: {job}")
    kosmos2_5_patches(job.image, 4096)
    pages += 1
    largest = max(largest, job.image.size, key=lambda s: s[0] * s[1])
    job.image = None
with open("/proc/self/status") as status:
    peak = int(re.search(r"VmHWM:\\s*(\\d+) kB", status.read()).group(1)) / 1024
print(json.dumps({"pages": pages, "largest": largest, "peak_mib": peak, "seconds": time.perf_counter() - started}))
"""


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------


def scan(mode: str) -> Image.Image:
    """A SIDE×SIDE page in ``mode``: white, with dark text-like bars and a grey box (compresses well)."""
    im = Image.new(mode, (SIDE, SIDE), {"1": 1, "I;16": 65535}.get(mode, "white"))
    draw = ImageDraw.Draw(im)
    ink = {"1": 0, "I;16": 4000}.get(mode, (20, 20, 60))
    for row in range(600, SIDE - 600, 240):
        for col in range(800, SIDE - 800, 1900):
            draw.rectangle((col, row, col + 1500, row + 90), fill=ink)
    draw.rectangle((3000, 3000, 6000, 5000), fill={"1": 0, "I;16": 30000}.get(mode, (150, 150, 150)))
    return im


# A letter page of text in Helvetica plus a few rules and a filled box, as a PDF content stream.
def page_content(k: int) -> bytes:
    lines = [b"0.2 0.2 0.5 rg 54 700 504 40 re f", b"0 g 0.5 w 54 690 m 558 690 l S", b"BT /F1 9 Tf 11 TL 54 670 Td"]
    for n in range(55):
        lines.append(f"(Page {k + 1}, line {n + 1}: the quick brown fox jumps over the lazy dog 0123456789.) '".encode())
    lines.append(b"ET")
    return b"\n".join(lines)


def write_pdf(path: Path, n_pages: int) -> None:
    """A letter-size PDF of ``n_pages`` text pages, written by hand (standard font, no embedding)."""
    objs = {1: b"<< /Type /Catalog /Pages 2 0 R >>",
            3: b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>"}
    kids = []
    for k in range(n_pages):
        page, content = 4 + 2 * k, 5 + 2 * k
        data = page_content(k)
        objs[page] = (f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {content} 0 R "
                      f"/Resources << /Font << /F1 3 0 R >> >> >>").encode()
        objs[content] = f"<< /Length {len(data)} >>\nstream\n".encode() + data + b"\nendstream"
        kids.append(f"{page} 0 R")
    objs[2] = f"<< /Type /Pages /Kids [{' '.join(kids)}] /Count {n_pages} >>".encode()
    out, offsets = bytearray(b"%PDF-1.4\n"), {}
    for num in sorted(objs):
        offsets[num] = len(out)
        out += f"{num} 0 obj\n".encode() + objs[num] + b"\nendobj\n"
    xref, count = len(out), max(objs) + 1
    out += f"xref\n0 {count}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{offsets[num]:010d} 00000 n \n".encode() for num in range(1, count))
    out += f"trailer\n<< /Size {count} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    path.write_bytes(bytes(out))


def make_png_1bit(path: Path) -> None:
    scan("1").save(path, optimize=True)


def make_png_rgb(path: Path) -> None:
    scan("RGB").save(path, compress_level=1)


def make_jpeg_rgb(path: Path) -> None:
    scan("RGB").save(path, quality=90)


def make_tiff_16bit(path: Path) -> None:
    scan("I;16").save(path, compression="tiff_adobe_deflate")


def make_folder(path: Path) -> None:
    path.mkdir()
    for k in range(4):
        write_pdf(path / f"report{k + 1}.pdf", 50)


# name: (what it is, the input's name in --dir, its maker, --dpi)
CASES = {
    "png-1bit": (f"{SIDE}² 1-bit PNG (fax-like scan)", "scan-1bit.png", make_png_1bit, 200),
    "png-rgb": (f"{SIDE}² RGB PNG", "scan-rgb.png", make_png_rgb, 200),
    "jpeg-rgb": (f"{SIDE}² RGB JPEG", "scan-rgb.jpg", make_jpeg_rgb, 200),
    "tiff-16bit": (f"{SIDE}² 16-bit grey TIFF (deflate)", "scan-16bit.tif", make_tiff_16bit, 200),
    "pdf-1200dpi-1": ("letter PDF, 1 page, --dpi 1200", "letter-1.pdf", lambda p: write_pdf(p, 1), 1200),
    "pdf-1200dpi-4": ("letter PDF, 4 pages, --dpi 1200", "letter-4.pdf", lambda p: write_pdf(p, 4), 1200),
    "folder-200": ("folder, 4 PDFs × 50 letter pages, default dpi", "folder-200", make_folder, 200),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, required=True, help="where the inputs are written (kept for re-runs)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of: {', '.join(CASES)}")
    args = parser.parse_args()
    names = [name for name in args.cases.split(",") if name]
    unknown = [name for name in names if name not in CASES]
    if unknown:
        parser.error(f"unknown cases: {', '.join(unknown)}")
    args.dir.mkdir(parents=True, exist_ok=True)
    print("| case | input | pages | largest working image | peak RSS | time |")
    print("|---|---|---|---|---|---|")
    for name in names:
        what, file, make, dpi = CASES[name]
        path = args.dir / file
        if not path.exists():
            started = time.perf_counter()
            make(path)
            print(f"(wrote {path} in {time.perf_counter() - started:.0f} s)", file=sys.stderr)
        run = subprocess.run([sys.executable, "-c", MEASURE, str(dpi), str(path)], capture_output=True, text=True)
        if run.returncode:
            print(f"| {name} | {what} | failed: {run.stderr.strip().splitlines()[-1:]} | | | |")
            continue
        out = json.loads(run.stdout)
        w, h = out["largest"]
        print(f"| {name} | {what} | {out['pages']} | {w}×{h} | {out['peak_mib']:,.0f} MiB | {out['seconds']:.1f} s |",
              flush=True)


if __name__ == "__main__":
    main()
