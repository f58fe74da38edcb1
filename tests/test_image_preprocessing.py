"""Image preprocessing parity with transformers' PIL image processors (the oracle)."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from kosmos_cli.processing import images as im
from kosmos_cli.processing.images import (
    KOSMOS2_IMAGE_PROCESSOR_DEFAULTS,
    PatchGrid,
    clip_pixels,
    kosmos2_5_patches,
    read_image_processor_config,
    to_rgb,
)

transformers = pytest.importorskip("transformers")
from transformers.image_transforms import convert_to_rgb  # noqa: E402
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil  # noqa: E402
from transformers.models.kosmos2_5.image_processing_pil_kosmos2_5 import (  # noqa: E402
    Kosmos2_5ImageProcessorPil,
)

TOL = 1e-5


# ---------------------------------------------------------------------------------------------
# test images (fixed seeds)
# ---------------------------------------------------------------------------------------------


def noise(width: int, height: int, channels: int = 3, seed: int = 0, low: int = 0, high: int = 256) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (height, width, channels) if channels > 1 else (height, width)
    return rng.integers(low, high, shape, dtype=np.uint8)


def gradient(width: int, height: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    r = x * 255 // max(width - 1, 1)
    g = y * 255 // max(height - 1, 1)
    b = (x + y) * 255 // max(width + height - 2, 1)
    return np.stack([r, g, b], -1).astype(np.uint8)


def png_roundtrip(image: Image.Image) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    buffer.seek(0)
    out = Image.open(buffer)
    out.load()
    return out


def make_image(kind: str, width: int = 96, height: int = 64) -> Image.Image:
    rgb = Image.fromarray(noise(width, height, seed=1) // 2 + gradient(width, height) // 2)
    if kind == "RGB":
        return rgb
    if kind == "RGB-noise":
        return Image.fromarray(noise(width, height, seed=2))
    if kind == "gradient":
        return Image.fromarray(gradient(width, height))
    if kind == "RGBA":
        alpha = noise(width, height, channels=1, seed=3)
        alpha[: height // 3] = 0  # fully transparent band
        alpha[-height // 3 :] = 255  # opaque band
        return Image.fromarray(np.dstack([np.asarray(rgb), alpha]))  # mode RGBA
    if kind == "L":
        return rgb.convert("L")
    if kind == "LA":
        alpha = noise(width, height, channels=1, seed=4)
        return Image.merge("LA", (rgb.convert("L"), Image.fromarray(alpha)))
    if kind == "P":
        return png_roundtrip(rgb.quantize(colors=32))
    if kind == "P-transparency":
        pal = rgb.quantize(colors=32)
        pal.info["transparency"] = 5  # palette index 5 is transparent
        out = png_roundtrip(pal)
        assert out.mode == "P" and out.info.get("transparency") is not None
        return out
    if kind == "PA":
        return rgb.quantize(colors=16).convert("PA")
    if kind == "1":
        return rgb.convert("1")  # dithered
    if kind == "I;16":
        # 16-bit grey: part 0..255, part above (Pillow clips those to 255)
        values = (noise(width, height, channels=1, seed=5).astype(np.uint16) * 3)
        values[:, : width // 2] //= 3
        return Image.fromarray(values)  # mode I;16
    if kind == "I;16-png":
        values = noise(width, height, channels=1, seed=6).astype(np.uint16) * 200
        return png_roundtrip(Image.fromarray(values))
    if kind == "I;16B":
        values = noise(width, height, channels=1, seed=7).astype(">u2")
        return Image.frombytes("I;16B", (width, height), values.tobytes())
    if kind == "I":
        values = noise(width, height, channels=1, seed=8).astype(np.int32) * 2 - 100
        return Image.fromarray(values)  # mode I
    if kind == "F":
        values = noise(width, height, channels=1, seed=9).astype(np.float32) * 1.3 - 20.5
        return Image.fromarray(values)  # mode F
    if kind == "CMYK":
        return Image.frombytes("CMYK", (width, height), noise(width, height, channels=4, seed=10).tobytes())
    if kind == "YCbCr":
        return rgb.convert("YCbCr")
    if kind == "RGB-transparency":
        out = rgb.copy()
        out.info["transparency"] = tuple(int(v) for v in np.asarray(rgb)[0, 0])
        return out
    if kind == "LAB":
        return Image.frombytes("LAB", (width, height), noise(width, height, seed=11).tobytes())
    raise ValueError(kind)


ALL_MODES = [
    "RGB", "RGBA", "L", "LA", "P", "P-transparency", "PA", "1", "I;16", "I;16-png", "I;16B", "I",
    "F", "CMYK", "YCbCr", "RGB-transparency", "LAB",
]


# ---------------------------------------------------------------------------------------------
# oracles
# ---------------------------------------------------------------------------------------------

_KOSMOS2_5 = Kosmos2_5ImageProcessorPil()


def oracle_patches(image: Image.Image, max_patches: int) -> dict:
    out = _KOSMOS2_5(images=[image], max_patches=max_patches, return_tensors=None)
    return {
        "patches": np.asarray(out["flattened_patches"][0]),
        "width": int(out["width"][0]),
        "height": int(out["height"][0]),
        "rows": int(out["rows"][0]),
        "cols": int(out["cols"][0]),
        "mask": np.asarray(out["attention_mask"][0]),
    }


def assert_patch_parity(image: Image.Image, max_patches: int) -> float:
    ref = oracle_patches(image, max_patches)
    got = kosmos2_5_patches(image, max_patches)
    assert isinstance(got, PatchGrid)
    assert got.patches.dtype == torch.float32
    assert tuple(got.patches.shape) == ref["patches"].shape == (max_patches, 770)
    assert (got.rows, got.cols) == (ref["rows"], ref["cols"])
    assert (got.width, got.height) == (ref["width"], ref["height"])
    assert (got.width, got.height) == (got.cols * 16, got.rows * 16)
    assert got.num_patches == got.rows * got.cols <= max_patches
    diff = float(np.abs(got.patches.numpy() - ref["patches"]).max())
    assert diff <= TOL, f"max abs diff {diff}"
    # the oracle's patch mask is "row not all zero"; ours is "row < num_patches"
    assert np.array_equal(ref["mask"] != 0, np.arange(max_patches) < got.num_patches)
    return diff


# ---------------------------------------------------------------------------------------------
# to_rgb
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ALL_MODES)
def test_to_rgb_matches_oracle(kind):
    image = make_image(kind, 37, 23)
    got = to_rgb(image)
    assert got.mode == "RGB" and got.size == image.size
    assert np.array_equal(np.asarray(got), convert_to_rgb(image, return_numpy=True))


def test_to_rgb_facts():
    # 16-bit values are clipped to 255, not scaled
    grey16 = Image.fromarray(np.array([[0, 100, 255, 256, 40000]], dtype=np.uint16))
    assert np.asarray(to_rgb(grey16))[0, :, 0].tolist() == [0, 100, 255, 255, 255]
    # transparent pixels become white, opaque ones keep their colour
    rgba = Image.fromarray(np.array([[[10, 20, 30, 0], [10, 20, 30, 255]]], dtype=np.uint8))
    assert np.asarray(to_rgb(rgba)).tolist() == [[[255, 255, 255], [10, 20, 30]]]
    # no EXIF transpose: the oracle's image processors do not apply it
    image = Image.fromarray(gradient(8, 4))
    exif = image.getexif()
    exif[0x0112] = 6  # orientation: rotate 90
    tagged = Image.open(_save_jpeg(image, exif))
    assert to_rgb(tagged).size == (8, 4)


def _save_jpeg(image, exif):
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    buffer.seek(0)
    return buffer


# ---------------------------------------------------------------------------------------------
# Kosmos-2.5 patches
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind", ["RGB", "RGBA", "L", "LA", "P", "P-transparency", "1", "I;16", "I;16-png", "CMYK", "YCbCr"]
)
def test_kosmos2_5_modes(kind):
    assert_patch_parity(make_image(kind, 96, 64), 256)


@pytest.mark.parametrize("max_patches", [16, 64, 256, 1024, 4096])
@pytest.mark.parametrize("kind", ["RGB-noise", "gradient"])
def test_kosmos2_5_max_patches(kind, max_patches):
    assert_patch_parity(make_image(kind, 120, 90), max_patches)


@pytest.mark.parametrize("size", [(1, 1), (3, 2), (2, 3), (20, 4000), (4000, 20), (17, 33)])
@pytest.mark.parametrize("max_patches", [16, 1024])
def test_kosmos2_5_tiny_and_extreme(size, max_patches):
    width, height = size
    assert_patch_parity(Image.fromarray(noise(width, height, seed=width * 7 + height)), max_patches)


def test_kosmos2_5_constant_images():
    # std == 0: the oracle divides by 1/sqrt(N) instead
    for colour in [(0, 0, 0), (255, 255, 255), (200, 200, 200), (12, 200, 99)]:
        assert_patch_parity(Image.new("RGB", (50, 70), colour), 64)


def test_kosmos2_5_large_page():
    # A 2500x3300 "scan": light background, dark strokes, a gradient and noise.
    height, width = 3300, 2500
    page = np.full((height, width, 3), 245, np.uint8)
    page[::40, 100:2400] = 30
    page[:, ::300] = 60
    page = np.clip(page.astype(np.int16) + noise(width, height, seed=12, high=9) - 4, 0, 255).astype(np.uint8)
    page[3000:] = gradient(width, 300)
    image = Image.fromarray(page)
    diff = assert_patch_parity(image, 4096)
    assert diff <= TOL


def test_kosmos2_5_large_constant_page_reproduces_numpy_rounding():
    # numpy's float32 mean of 24.75M values of 200 is 199.99998, std 1.5e-5 < 1/sqrt(N), so the
    # oracle outputs ~0.076 everywhere instead of 0. We reproduce numpy's summation exactly.
    height, width = 3300, 2500
    pixels = torch.full((height, width, 3), 200.0)
    counts = [0] * 256
    counts[200] = height * width * 3
    mean, divisor = im._standardisation(pixels, counts)
    reference = np.full((3, height, width), 200, np.float32)
    np_mean = np.mean(np.moveaxis(np.moveaxis(reference, 0, -1).copy(), -1, 0))
    assert mean == float(np_mean) == float(np.float32(199.99998))
    assert divisor == float(np.float32(1.0 / math.sqrt(height * width * 3)))
    grid = kosmos2_5_patches(Image.new("RGB", (width, height), (200, 200, 200)), 64)
    expected = (np.float32(200) - np.float32(mean)) / np.float32(divisor)
    assert float(expected) > 0.07
    # (the resize's weights sum to 1 only up to float32 rounding)
    assert float((grid.patches[: grid.num_patches, 2:] - float(expected)).abs().max()) <= 1e-6


@pytest.mark.parametrize(
    "shape", [(1, 1), (7, 5), (151, 149), (257, 301), (640, 480), (1001, 777)]
)
def test_standardisation_matches_numpy(shape):
    height, width = shape
    for seed, data in enumerate(
        [noise(width, height, seed=1), np.full((height, width, 3), 250, np.uint8), gradient(width, height)]
    ):
        data = data.copy()
        data.reshape(-1)[:: 97 + seed] = 3  # a sprinkle of dark values
        image = Image.fromarray(data)
        histogram = image.histogram()
        counts = [histogram[k] + histogram[256 + k] + histogram[512 + k] for k in range(256)]
        mean, divisor = im._standardisation(im._rgb_bytes(image).float(), counts)
        chw = np.moveaxis(data.astype(np.float32), -1, 0)  # the oracle's layout
        ref_std = np.std(chw)
        ref_div = max(ref_std, 1.0 / math.sqrt(np.prod(chw.shape)))
        assert mean == float(np.mean(chw))  # bit for bit
        assert abs(divisor - float(np.float32(ref_div))) <= 2e-7 * divisor


def test_patch_layout():
    # A 64x32 image with max_patches 8 is a 2x4 grid at its own size (the resize is the
    # identity), so each patch value can be located in the standardised image.
    data = noise(64, 32, seed=13)
    grid = kosmos2_5_patches(Image.fromarray(data), 8)
    assert (grid.rows, grid.cols, grid.width, grid.height) == (2, 4, 64, 32)
    assert grid.patches[:, :2].tolist() == [[r, c] for r in (1, 2) for c in (1, 2, 3, 4)]
    x = data.astype(np.float32)
    standardised = (x - x.mean()) / x.std()  # (H, W, C)
    for r in range(2):
        for c in range(4):
            patch = grid.patches[r * 4 + c, 2:].numpy().reshape(16, 16, 3)  # (y, x, channel)
            expected = standardised[r * 16 : (r + 1) * 16, c * 16 : (c + 1) * 16]
            assert np.abs(patch - expected).max() <= TOL


def test_kosmos2_5_rejects_bad_max_patches():
    with pytest.raises(ValueError):
        kosmos2_5_patches(Image.new("RGB", (4, 4)), 0)


# ---------------------------------------------------------------------------------------------
# Kosmos-2 (CLIP)
# ---------------------------------------------------------------------------------------------

_CLIP = CLIPImageProcessorPil(**KOSMOS2_IMAGE_PROCESSOR_DEFAULTS)


def oracle_clip(image, processor=_CLIP) -> np.ndarray:
    return np.asarray(processor(images=[image], return_tensors=None)["pixel_values"][0])


@pytest.mark.parametrize(
    "kind,size",
    [
        ("RGB", (224, 224)),
        ("RGB", (640, 480)),
        ("RGB-noise", (100, 300)),
        ("RGBA", (300, 97)),
        ("L", (50, 60)),
        ("P-transparency", (225, 223)),
        ("1", (31, 400)),
        ("I;16", (128, 96)),
        ("CMYK", (333, 222)),
        ("RGB", (1, 1)),
    ],
)
def test_clip_pixels_released_config(kind, size):
    image = make_image(kind, *size)
    got = clip_pixels(image, KOSMOS2_IMAGE_PROCESSOR_DEFAULTS)
    ref = oracle_clip(image)
    assert got.dtype == torch.float32 and tuple(got.shape) == ref.shape == (3, 224, 224)
    assert float(np.abs(got.numpy() - ref).max()) <= TOL


def test_clip_pixels_defaults_fill_missing_fields():
    image = make_image("RGB", 300, 200)
    ref = oracle_clip(image)
    for config in (None, {}, {"image_processor_type": "CLIPImageProcessor"}):
        assert float(np.abs(clip_pixels(image, config).numpy() - ref).max()) <= TOL


@pytest.mark.parametrize(
    "overrides",
    [
        {"use_square_size": False},  # shortest edge 224 then centre crop 224
        {"use_square_size": False, "crop_size": {"height": 300, "width": 260}},  # crop pads
        {"size": {"height": 100, "width": 150}, "use_square_size": False, "do_center_crop": False},
        {"do_normalize": False},
    ],
)
def test_clip_pixels_other_configs(overrides):
    config = {**KOSMOS2_IMAGE_PROCESSOR_DEFAULTS, **overrides}
    processor = CLIPImageProcessorPil(**config)
    for size in [(500, 300), (300, 500)]:
        image = make_image("RGB-noise", *size)
        ref = oracle_clip(image, processor)
        got = clip_pixels(image, config)
        assert tuple(got.shape) == ref.shape
        assert float(np.abs(got.numpy() - ref).max()) <= TOL


# ---------------------------------------------------------------------------------------------
# config files
# ---------------------------------------------------------------------------------------------


def write_json(path, data):
    path.write_text(json.dumps(data), encoding="utf-8")


def test_read_config_old_layout(tmp_path):
    write_json(tmp_path / "preprocessor_config.json", KOSMOS2_IMAGE_PROCESSOR_DEFAULTS)
    config = read_image_processor_config(tmp_path)
    assert config == KOSMOS2_IMAGE_PROCESSOR_DEFAULTS
    image = make_image("RGB", 320, 200)
    ref = oracle_clip(image, CLIPImageProcessorPil.from_pretrained(str(tmp_path)))
    assert float(np.abs(clip_pixels(image, config).numpy() - ref).max()) <= TOL


def test_read_config_nested_layout_with_int_size(tmp_path):
    nested = {**KOSMOS2_IMAGE_PROCESSOR_DEFAULTS, "size": 224, "crop_size": 224}
    nested.pop("use_square_size")
    write_json(tmp_path / "processor_config.json", {"image_processor": nested, "processor_class": "Kosmos2Processor"})
    config = read_image_processor_config(str(tmp_path))
    assert config["size"] == {"shortest_edge": 224}
    assert config["crop_size"] == {"height": 224, "width": 224}
    assert config["image_mean"] == KOSMOS2_IMAGE_PROCESSOR_DEFAULTS["image_mean"]
    image = make_image("RGB-noise", 300, 200)
    ref = oracle_clip(image, CLIPImageProcessorPil.from_pretrained(str(tmp_path)))
    assert ref.shape == (3, 224, 224)
    assert float(np.abs(clip_pixels(image, config).numpy() - ref).max()) <= TOL


def test_read_config_nested_wins_like_transformers(tmp_path):
    write_json(tmp_path / "preprocessor_config.json", {"size": {"shortest_edge": 1}})
    write_json(tmp_path / "processor_config.json", {"image_processor": {"size": {"height": 5, "width": 6}}})
    assert read_image_processor_config(tmp_path)["size"] == {"height": 5, "width": 6}


def test_read_config_legacy_processor_file_falls_back(tmp_path):
    # fine-tunes carry a processor_config.json with only processor fields
    write_json(tmp_path / "processor_config.json", {"num_patch_index_tokens": 1024, "processor_class": "Kosmos2Processor"})
    write_json(tmp_path / "preprocessor_config.json", {"size": {"height": 224, "width": 224}, "resample": 3})
    assert read_image_processor_config(tmp_path) == {"size": {"height": 224, "width": 224}, "resample": 3}
    (tmp_path / "preprocessor_config.json").unlink()
    assert read_image_processor_config(tmp_path)["num_patch_index_tokens"] == 1024


def test_read_config_kosmos2_5_release(tmp_path):
    release = {"image_processor_type": "Kosmos2_5ImageProcessor", "processor_class": "Kosmos2_5Processor"}
    write_json(tmp_path / "preprocessor_config.json", release)
    config = read_image_processor_config(tmp_path)
    assert config == release
    settings = {**im.KOSMOS2_5_IMAGE_PROCESSOR_DEFAULTS, **config}
    assert settings["max_patches"] == 4096 and settings["patch_size"] == {"height": 16, "width": 16}
    write_json(tmp_path / "preprocessor_config.json", {**release, "patch_size": 16, "max_patches": 1024})
    assert read_image_processor_config(tmp_path)["patch_size"] == {"height": 16, "width": 16}


def test_read_config_missing(tmp_path):
    with pytest.raises(ValueError, match="preprocessor_config.json"):
        read_image_processor_config(tmp_path)


@pytest.mark.parametrize("name", ["preprocessor_config.json", "processor_config.json"])
def test_read_config_broken_json(tmp_path, name):
    (tmp_path / name).write_text('{"size": {"height": 224,', encoding="utf-8")
    with pytest.raises(ValueError, match=name):
        read_image_processor_config(tmp_path)


def test_read_config_not_an_object(tmp_path):
    write_json(tmp_path / "preprocessor_config.json", [1, 2, 3])
    with pytest.raises(ValueError, match="preprocessor_config.json"):
        read_image_processor_config(tmp_path)
