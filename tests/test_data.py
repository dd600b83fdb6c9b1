"""Reading real image folders: decoding edge cases, captions, the skip report, aspect-ratio buckets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from egaku.data.buckets import BucketBatches, fit_to_bucket, make_buckets, nearest_bucket, to_tensor
from egaku.data.folder import scan_image_folder
from egaku.data.images import ImageError, open_image
from egaku.errors import EgakuError


# ---- open_image ------------------------------------------------------------------------------------

def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), "white")
    img.paste((255, 0, 0), (0, 0, 10, 20))  # red strip on the left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": a phone held upright
    img.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    out = open_image(tmp_path / "phone.jpg")
    assert out.size == (20, 40)
    top = np.asarray(out)[2, 10]
    assert top[0] > 200 and top[1] < 60  # the stored left strip is now at the top


def test_transparency_is_composited_on_white(tmp_path):
    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(tmp_path / "clear.png")
    Image.new("LA", (8, 8), (0, 128)).save(tmp_path / "grey_alpha.png")
    assert np.asarray(open_image(tmp_path / "clear.png")).min() == 255
    half = np.asarray(open_image(tmp_path / "grey_alpha.png"))
    assert 120 <= half.mean() <= 135  # black at 50% over white


def test_palette_cmyk_16bit_and_grey_convert_to_rgb(tmp_path):
    pal = Image.new("P", (4, 4))
    pal.putpalette([0, 0, 255] + [0] * 765)
    pal.save(tmp_path / "pal.png")
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16)).save(tmp_path / "deep.png")
    Image.new("L", (4, 4), 77).save(tmp_path / "grey.png")
    assert tuple(np.asarray(open_image(tmp_path / "pal.png"))[0, 0]) == (0, 0, 255)
    r, g, b = np.asarray(open_image(tmp_path / "cmyk.jpg"))[0, 0]
    assert r > 200 and g < 60 and b < 60
    assert np.asarray(open_image(tmp_path / "deep.png")).min() == 255  # full 16-bit white stays white
    grey = open_image(tmp_path / "grey.png")
    assert grey.mode == "RGB" and tuple(np.asarray(grey)[0, 0]) == (77, 77, 77)


def test_broken_files_raise_image_error_with_a_reason(tmp_path):
    Image.new("RGB", (64, 64), "red").save(tmp_path / "ok.jpg")
    data = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ImageError, match="truncated or corrupt"):
        open_image(tmp_path / "cut.jpg")
    with pytest.raises(ImageError, match="empty file"):
        open_image(tmp_path / "empty.png")
    with pytest.raises(ImageError, match="not an image"):
        open_image(tmp_path / "notes.png")


def test_decompression_bomb_is_refused(tmp_path):
    Image.new("L", (300, 300)).save(tmp_path / "big.png")
    with pytest.raises(ImageError, match="decompression bomb"):
        open_image(tmp_path / "big.png", max_pixels=200 * 200)


# ---- scan_image_folder -----------------------------------------------------------------------------

def _img(path: Path, size=(16, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, "blue").save(path)
    return path


def test_imagefolder_classes_become_captions_and_caption_files_win(tmp_path):
    _img(tmp_path / "golden_retriever" / "a.png")
    _img(tmp_path / "golden_retriever" / "b.png")
    (tmp_path / "golden_retriever" / "b.txt").write_text("a dog on a beach\n")
    _img(tmp_path / "cat" / "c.png")
    (tmp_path / "cat" / "c.caption").write_text("a sleeping cat")
    scan = scan_image_folder(tmp_path, caption_template="a photo of {class}", trigger="sks")
    captions = {i.path.name: i.caption for i in scan.items}
    assert captions == {"a.png": "sks, a photo of golden retriever", "b.png": "sks, a dog on a beach",
                        "c.png": "sks, a sleeping cat"}
    assert scan.classes == ["cat", "golden_retriever"]


def test_metadata_jsonl_takes_precedence_and_csv_is_read(tmp_path):
    _img(tmp_path / "x.png")
    (tmp_path / "x.txt").write_text("from the caption file")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "x.png", "text": "from metadata"}) + "\n")
    assert scan_image_folder(tmp_path).items[0].caption == "from metadata"
    other = tmp_path / "csv"
    _img(other / "y.png")
    (other / "metadata.csv").write_text("file_name,caption\ny.png,a csv caption\n")
    assert scan_image_folder(other).items[0].caption == "a csv caption"


def test_skip_report_lists_each_unusable_file_and_too_few_is_an_error(tmp_path):
    _img(tmp_path / "good.png")
    (tmp_path / "zero.jpg").write_bytes(b"")
    (tmp_path / "readme.md").write_text("hi")
    (tmp_path / "fake.png").write_text("text")
    scan = scan_image_folder(tmp_path)
    reasons = {p.name: r for p, r in scan.skipped}
    assert len(scan.items) == 1
    assert "empty file" in reasons["zero.jpg"] and "extension" in reasons["readme.md"]
    assert "not an image" in reasons["fake.png"]
    with pytest.raises(EgakuError, match=r"found 1 usable images, need at least 3(.|\n)*zero.jpg"):
        scan_image_folder(tmp_path, min_images=3)


def test_bad_metadata_and_missing_folder_are_errors(tmp_path):
    with pytest.raises(EgakuError, match="does not exist"):
        scan_image_folder(tmp_path / "nope")
    _img(tmp_path / "x.png")
    (tmp_path / "metadata.jsonl").write_text("{broken\n")
    with pytest.raises(EgakuError, match="line 1 is not valid JSON"):
        scan_image_folder(tmp_path)


# ---- buckets ---------------------------------------------------------------------------------------

def test_buckets_respect_step_area_and_aspect_limit():
    buckets = make_buckets(512, step=64, max_ratio=2.0)
    assert (512, 512) in buckets and (640, 384) in buckets and (384, 640) in buckets
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 and max(w / h, h / w) <= 2.0


def test_each_image_keeps_its_shape_without_distortion():
    buckets = make_buckets(512, step=64)
    assert nearest_bucket((1000, 1000), buckets) == (512, 512)
    wide = nearest_bucket((1920, 1080), buckets)
    assert wide[0] > wide[1]
    img = Image.new("RGB", (1920, 1080))
    fitted = fit_to_bucket(img, wide)
    assert fitted.size == wide
    # scale is uniform: the crop removes at most a few percent of either side
    assert 1920 / 1080 == pytest.approx(wide[0] / wide[1], rel=0.15)


def test_flip_mirrors_and_range_is_minus_one_to_one():
    img = Image.new("RGB", (4, 2), "black")
    img.putpixel((0, 0), (255, 255, 255))
    plain, flipped = to_tensor(img), to_tensor(img, flip=True)
    assert plain.shape == (3, 2, 4) and plain.min() == -1 and plain.max() == 1
    assert plain[0, 0, 0] == 1 and flipped[0, 0, 3] == 1


def test_batches_hold_one_bucket_and_are_reproducible_per_epoch():
    bucket_of = [(64, 64)] * 5 + [(96, 40)] * 3
    order = BucketBatches(bucket_of, batch_size=2, seed=3)
    epoch0 = order.batches(0)
    assert epoch0 == order.batches(0) and epoch0 != order.batches(1)
    assert sorted(i for b in epoch0 for i in b) == list(range(8))
    for batch in epoch0:
        assert len({bucket_of[i] for i in batch}) == 1
