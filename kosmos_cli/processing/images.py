"""Image preprocessing for Kosmos-2.5 (flattened patches) and Kosmos-2 (CLIP pixels).

Both functions reproduce the PIL backends of transformers 5.23 (`Kosmos2_5ImageProcessorPil`,
`CLIPImageProcessorPil`), which the tests use as the oracle, to within 1e-5. Only Pillow and torch
are needed; numpy is not used.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from ..models.loading import ModelLoadError, read_json

__all__ = [
    "KOSMOS2_IMAGE_PROCESSOR_DEFAULTS",
    "KOSMOS2_5_IMAGE_PROCESSOR_DEFAULTS",
    "PatchGrid",
    "clip_pixels",
    "kosmos2_5_patches",
    "patch_grid_shape",
    "read_image_processor_config",
    "to_rgb",
]

# `preprocessor_config.json` of microsoft/kosmos-2-patch14-224 as released on the Hub (a CLIP image
# processor). `use_square_size` makes transformers resize to exactly 224x224, ignoring the aspect
# ratio; the centre crop is then a no-op. Used for any field a local config leaves out.
KOSMOS2_IMAGE_PROCESSOR_DEFAULTS: dict = {
    "crop_size": {"height": 224, "width": 224},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_processor_type": "CLIPImageProcessor",
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "processor_class": "Kosmos2Processor",
    "resample": 3,  # PIL bicubic
    "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 224},
    "use_square_size": True,
}

# microsoft/kosmos-2.5 ships only {"image_processor_type": "Kosmos2_5ImageProcessor",
# "processor_class": "Kosmos2_5Processor"}; everything else is the image processor's code default.
KOSMOS2_5_IMAGE_PROCESSOR_DEFAULTS: dict = {
    "image_processor_type": "Kosmos2_5ImageProcessor",
    "processor_class": "Kosmos2_5Processor",
    "do_convert_rgb": True,
    "do_normalize": True,
    "max_patches": 4096,
    "patch_size": {"height": 16, "width": 16},
}


# --------------------------------------------------------------------------------------------
# Colour conversion
# --------------------------------------------------------------------------------------------


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL image to 8-bit RGB the way transformers' `convert_to_rgb` does.

    Images with an alpha band, or with a `transparency` entry in `image.info` (palette or
    grey/RGB PNGs with a tRNS chunk), are composited onto opaque white; everything else goes
    through Pillow's own `convert("RGB")`. Consequences, all shared with the oracle:
    - 16-bit and 32-bit integer images (I;16, I;16B, I) are clipped, not scaled: values above
      255 become 255, so a full-range 16-bit scan comes out almost white. "F" is truncated and
      clipped to 0..255. Files read by `kosmos_cli.documents` reach this already in 8 bits,
      scaled (the one rule for files and why they differ from this: `kosmos_cli.rasters`).
    - "1" maps to 0/255; CMYK and YCbCr use Pillow's conversion formulas.
    - "LAB" counts as having alpha (its bands are L, A, B) and is composited on white;
      premultiplied "RGBa" is converted without compositing; "La" is rejected by Pillow.
    - The EXIF orientation is not applied (only transformers' `load_image` applies it, not the
      image processors).
    """
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if not has_alpha:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _rgb_bytes(rgb: Image.Image) -> torch.Tensor:
    """(H, W, 3) uint8 tensor of an RGB PIL image."""
    width, height = rgb.size
    data = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
    return data.view(height, width, 3)


# --------------------------------------------------------------------------------------------
# Kosmos-2.5: per-image standardisation, resize to a patch grid, flattened patches
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PatchGrid:
    """Kosmos-2.5 vision input for one image.

    patches: (max_patches, 2 + patch*patch*3) float32. Row r*cols + c holds [r + 1, c + 1, pixels]
    with the pixels of that patch in (y, x, channel) order, channel fastest; rows past
    rows*cols are all zero (padding).
    width, height: the resized image size (cols*patch, rows*patch); the model's OCR
    coordinates live in this space.
    """

    patches: torch.Tensor
    rows: int
    cols: int
    width: int
    height: int

    @property
    def num_patches(self) -> int:
        return self.rows * self.cols


def _f32(x: float) -> float:
    """Round a Python float to the nearest float32 value."""
    return struct.unpack("f", struct.pack("f", x))[0]


# Values are integers 0..255, so any run of at most this many of them sums exactly in float32
# (every partial sum is an integer <= 255 * n <= 2**24), whatever the summation order.
_EXACT_RUN = (1 << 24) // 255


def _numpy_style_sum(flat: torch.Tensor) -> float:
    """float32 sum of `flat` (integer-valued float32) with numpy's pairwise summation.

    The oracle takes `np.mean` of the float32 image, and numpy sums contiguous float32 data
    pairwise: a block of n > 128 values is split at n2 = n//2 rounded down to a multiple of 8
    and the two halves' sums are added in float32. Below the _EXACT_RUN size a block's sum is
    exact, so only the top of the tree needs float32 emulation. Matching numpy here matters
    for near-constant pages: numpy's mean of a constant 200 page is 199.99998, and the
    division by max(std, 1/sqrt(N)) then turns that rounding error into 0.076 everywhere.
    """

    total = flat.numel()
    if total <= _EXACT_RUN:
        return float(flat.sum())

    # Every block starts at a multiple of 8 (left halves have lengths divisible by 8) and ends at
    # a multiple of 8 or at `total`, so exact block sums come from prefix sums over 8-value
    # chunks: two whole-tensor ops instead of hundreds of small reductions.
    whole = total - total % 8
    chunks = flat[:whole].view(-1, 8).sum(1)  # exact: integers <= 2040
    prefix = torch.zeros(chunks.numel() + 1, dtype=torch.float64)
    torch.cumsum(chunks, 0, dtype=torch.float64, out=prefix[1:])  # exact: integers < 2**53
    tail = float(flat[whole:].sum())

    leaves: list[tuple[int, int]] = []  # (start, end) of the exact blocks, left to right

    def collect(lo: int, n: int) -> None:
        if n <= _EXACT_RUN:
            leaves.append((lo, lo + n))
            return
        n2 = n // 2
        n2 -= n2 % 8
        collect(lo, n2)
        collect(lo + n2, n - n2)

    collect(0, total)
    cuts = torch.tensor([leaves[0][0]] + [end for _, end in leaves]) // 8
    at = prefix[cuts].tolist()
    sums = [at[i + 1] - at[i] for i in range(len(leaves))]
    sums[-1] += tail  # the last block ends at `total`, past the last whole chunk
    sums_iter = iter(sums)

    def block(n: int) -> float:
        # Same traversal order as `collect`, consuming the exact leaf sums.
        if n <= _EXACT_RUN:
            return next(sums_iter)
        n2 = n // 2
        n2 -= n2 % 8
        left = block(n2)
        return _f32(left + block(n - n2))

    return block(total)


def _standardisation(pixels: torch.Tensor, counts: list[int]) -> tuple[float, float]:
    """(mean, divisor) of the oracle's per-image standardisation, both float32 values.

    pixels: (H, W, 3) float32 holding 0..255; counts: histogram of all values (256 bins).
    The oracle computes in numpy float32: mean = float32(sum / n) with sum as above;
    std = sqrt(float32(sum((x - mean)**2) / n)), where x - mean and the square are rounded to
    float32 per element; divisor = max(std, 1 / sqrt(n)).
    """
    n = pixels.numel()
    mean = _f32(_numpy_style_sum(pixels.view(-1)) / n)
    # Each value k contributes the float32 square of float32(k - mean). numpy adds these
    # pairwise in float32; an exact float64 sum differs from that by a relative ~1e-7 (at most
    # 1 ulp of the std in our tests), which moves the outputs by far less than 1e-5.
    squares = 0.0
    for k, count in enumerate(counts):
        if count:
            d = _f32(k - mean)
            squares += count * _f32(d * d)
    std = _f32(math.sqrt(_f32(_f32(squares) / n)))
    floor = 1.0 / math.sqrt(n)
    divisor = floor if floor > std else std
    return mean, _f32(divisor)


def patch_grid_shape(height: int, width: int, max_patches: int, patch_size: int = 16) -> tuple[int, int]:
    """(rows, cols) of the largest patch grid with rows*cols <= max_patches at the image's aspect."""
    # Same expression order as the oracle so the floors agree in edge cases.
    scale = math.sqrt(max_patches * (patch_size / height) * (patch_size / width))
    rows = max(min(math.floor(scale * height / patch_size), max_patches), 1)
    cols = max(min(math.floor(scale * width / patch_size), max_patches), 1)
    return rows, cols


def kosmos2_5_patches(image: Image.Image, max_patches: int, patch_size: int = 16) -> PatchGrid:
    """Kosmos-2.5 flattened patches of one image, as `Kosmos2_5ImageProcessorPil` makes them.

    RGB -> standardise with the image's own mean and std (before resizing) -> bilinear
    antialiased resize to (rows*patch, cols*patch) -> patches in row-major order.
    """
    if max_patches < 1:
        raise ValueError(f"max_patches must be positive, got {max_patches}")
    rgb = to_rgb(image)
    width, height = rgb.size
    if width < 1 or height < 1:
        raise ValueError(f"image has no pixels ({width}x{height})")

    pixels = _rgb_bytes(rgb).float()  # (H, W, 3), memory order as numpy's (H, W, C) array
    histogram = rgb.histogram()  # 3 x 256 bins
    counts = [histogram[k] + histogram[256 + k] + histogram[512 + k] for k in range(256)]
    mean, divisor = _standardisation(pixels, counts)
    pixels.sub_(mean).div_(divisor)  # float32, rounded per step like numpy

    rows, cols = patch_grid_shape(height, width, max_patches, patch_size)
    # The oracle hands interpolate a channels-last (1, 3, H, W) view; we do the same.
    resized = F.interpolate(
        pixels.permute(2, 0, 1).unsqueeze(0),
        size=(rows * patch_size, cols * patch_size),
        mode="bilinear",
        align_corners=False,
        antialias=True,
    )[0]  # (3, rows*p, cols*p)

    # (3, R, p, C, p) -> (R, C, p_y, p_x, 3) -> (R*C, p*p*3)
    num = rows * cols
    depth = patch_size * patch_size * 3
    flat = resized.reshape(3, rows, patch_size, cols, patch_size).permute(1, 3, 2, 4, 0).reshape(num, depth)
    out = torch.zeros(max_patches, 2 + depth, dtype=torch.float32)
    out[:num, 0] = torch.arange(1, rows + 1, dtype=torch.float32).repeat_interleave(cols)
    out[:num, 1] = torch.arange(1, cols + 1, dtype=torch.float32).repeat(rows)
    out[:num, 2:] = flat
    return PatchGrid(patches=out, rows=rows, cols=cols, width=cols * patch_size, height=rows * patch_size)


# --------------------------------------------------------------------------------------------
# Kosmos-2: CLIP preprocessing
# --------------------------------------------------------------------------------------------


def _size_dict(size, default_to_square: bool) -> dict:
    """Accept an int, [h, w] or a dict for a size field, as transformers' `get_size_dict` does."""
    if isinstance(size, dict):
        return dict(size)
    if isinstance(size, bool) or size is None:
        raise ValueError(f"invalid size {size!r}")
    if isinstance(size, int):
        return {"height": size, "width": size} if default_to_square else {"shortest_edge": size}
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return {"height": int(size[0]), "width": int(size[1])}
    raise ValueError(f"invalid size {size!r}")


def _clip_resize_target(size: dict, use_square_size: bool, height: int, width: int) -> tuple[int, int]:
    """(height, width) the CLIP processor resizes to."""
    if use_square_size and "shortest_edge" in size:
        return size["shortest_edge"], size["shortest_edge"]
    if size.get("height") and size.get("width"):
        return size["height"], size["width"]
    if size.get("shortest_edge"):
        edge = size["shortest_edge"]
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(edge * long / short)
        return (new_long, edge) if width <= height else (edge, new_long)
    raise ValueError(f"unsupported CLIP size {size!r}: need height/width or shortest_edge")


def _center_crop(chw: torch.Tensor, crop_h: int, crop_w: int) -> torch.Tensor:
    """Centre crop of a (C, H, W) tensor, zero-padding first when the crop is larger (like transformers)."""
    _, height, width = chw.shape
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    if top >= 0 and left >= 0:
        return chw[:, top : top + crop_h, left : left + crop_w]
    new_h, new_w = max(crop_h, height), max(crop_w, width)
    pad_top, pad_left = math.ceil((new_h - height) / 2), math.ceil((new_w - width) / 2)
    padded = chw.new_zeros(chw.shape[0], new_h, new_w)
    padded[:, pad_top : pad_top + height, pad_left : pad_left + width] = chw
    top, left = top + pad_top, left + pad_left
    return padded[:, max(0, top) : min(new_h, top + crop_h), max(0, left) : min(new_w, left + crop_w)]


def clip_pixels(image: Image.Image, config: dict | None = None) -> torch.Tensor:
    """Kosmos-2 `pixel_values` of one image: (3, H, W) float32, like `CLIPImageProcessorPil`.

    config: the image-processor dict (see `read_image_processor_config`); missing fields take
    the released microsoft/kosmos-2-patch14-224 values. With those: PIL bicubic resize to
    exactly 224x224, x/255 (in float64, then float32), (x - mean) / std per channel in float32.
    """
    config = config or {}
    cfg = {**KOSMOS2_IMAGE_PROCESSOR_DEFAULTS, **config}
    if "size" in config and "use_square_size" not in config:
        # A config with its own size (e.g. one saved by transformers 5, which turns the released
        # use_square_size into size {"height": 224, "width": 224}) means what it says.
        cfg["use_square_size"] = False
    rgb = to_rgb(image)

    if cfg["do_resize"]:
        size = _size_dict(cfg["size"], default_to_square=False)
        new_h, new_w = _clip_resize_target(size, bool(cfg.get("use_square_size")), rgb.height, rgb.width)
        rgb = rgb.resize((new_w, new_h), resample=Image.Resampling(int(cfg["resample"])))

    chw = _rgb_bytes(rgb).permute(2, 0, 1)  # uint8 (3, H, W)
    if cfg["do_center_crop"]:
        crop = _size_dict(cfg["crop_size"], default_to_square=True)
        chw = _center_crop(chw, crop["height"], crop["width"])

    if cfg["do_rescale"]:
        # transformers multiplies in float64 and only then casts to float32.
        x = (chw.double() * float(cfg["rescale_factor"])).float()
    else:
        x = chw.float()
    if cfg["do_normalize"]:
        mean = torch.tensor(_per_channel(cfg["image_mean"]), dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(_per_channel(cfg["image_std"]), dtype=torch.float32).view(3, 1, 1)
        x = (x - mean) / std
    return x.contiguous()


def _per_channel(value) -> list[float]:
    if isinstance(value, (int, float)):
        return [float(value)] * 3
    values = [float(v) for v in value]
    if len(values) != 3:
        raise ValueError(f"expected 3 per-channel values, got {value!r}")
    return values


# --------------------------------------------------------------------------------------------
# Config files
# --------------------------------------------------------------------------------------------


def read_image_processor_config(model_dir: str | Path) -> dict:
    """The flat image-processor dict of a model directory.

    Reads `processor_config.json` (transformers 5 layout, image processor nested under
    "image_processor") first, as transformers does, and falls back to `preprocessor_config.json`
    (the layout of the released checkpoints). `size` and `crop_size` may be ints, [h, w] or dicts
    and come back as dicts (`size` int -> {"shortest_edge": n}, `crop_size` int -> a square);
    `patch_size` int -> {"height": n, "width": n}. Missing fields stay missing: callers fill them
    from KOSMOS2_IMAGE_PROCESSOR_DEFAULTS / KOSMOS2_5_IMAGE_PROCESSOR_DEFAULTS.
    Raises ModelLoadError (a ValueError) naming the file when neither file exists or one cannot be
    read (see read_json).
    """
    config = None
    processor = read_json(model_dir, "processor_config.json", required=False)
    if processor is not None and isinstance(processor.get("image_processor"), dict):
        config = processor["image_processor"]
    if config is None:
        flat = read_json(model_dir, "preprocessor_config.json", required=False)
        if flat is not None:
            nested = flat.get("image_processor")
            config = nested if isinstance(nested, dict) else flat
    if config is None:
        if processor is None:
            raise ModelLoadError(
                f"no image processor config in {model_dir}: expected preprocessor_config.json or processor_config.json"
            )
        # An old-style processor_config.json without the image processor in it: nothing to read.
        config = processor

    config = dict(config)
    try:
        if "size" in config and config["size"] is not None:
            config["size"] = _size_dict(config["size"], default_to_square=False)
        if "crop_size" in config and config["crop_size"] is not None:
            config["crop_size"] = _size_dict(config["crop_size"], default_to_square=True)
        if "patch_size" in config and config["patch_size"] is not None:
            config["patch_size"] = _size_dict(config["patch_size"], default_to_square=True)
    except ValueError as exc:
        raise ModelLoadError(f"bad image processor config in {model_dir}: {exc}") from exc
    return config
