"""Reading real image folders: decoding edge cases, captions, the skip report, aspect-ratio buckets."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, features

from egaku.data.buckets import BucketBatches, fit_to_bucket, make_buckets, nearest_bucket, to_tensor
from egaku.data.folder import scan_image_folder
from egaku.data.images import ImageError, alpha_channel, decode_image, open_image
from egaku.data.masks import find_mask_files, latent_mask, load_mask, masked_mean
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



def test_greyscale_trns_transparency_is_composited_on_white(tmp_path):
    # a greyscale PNG's tRNS chunk names the transparent grey value: 0 here, 8- and 16-bit
    grey = np.zeros((64, 64), np.uint8)
    grey[:, 32:] = 128
    Image.fromarray(grey, "L").save(tmp_path / "l_trns.png", transparency=0)
    deep = np.zeros((64, 64), np.uint16)
    deep[:, 32:] = 40000
    Image.fromarray(deep).save(tmp_path / "i16_trns.png", transparency=0)
    for name, opaque in (("l_trns.png", 128), ("i16_trns.png", round(40000 / 65535 * 255))):
        out = np.asarray(open_image(tmp_path / name))
        assert out[0, 0].tolist() == [255, 255, 255], name  # transparent: white, not black
        assert out[0, 40].tolist() == [opaque] * 3, name
        alpha = np.asarray(alpha_channel(decode_image(tmp_path / name)))
        assert alpha[0, 0] == 0 and alpha[0, 40] == 255, name  # the mask reading agrees

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
    # floating-point TIFFs hold 0..1 (or, written from 8-bit data, 0..255)
    Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32), "F").save(tmp_path / "unit.tiff")
    Image.fromarray(np.full((4, 4), 200.0, dtype=np.float32), "F").save(tmp_path / "bytes.tiff")
    assert tuple(np.asarray(open_image(tmp_path / "unit.tiff"))[0, 0]) == (128, 128, 128)
    assert tuple(np.asarray(open_image(tmp_path / "bytes.tiff"))[0, 0]) == (200, 200, 200)


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


def test_linked_class_folders_are_followed_and_broken_links_reported(tmp_path):
    """As torchvision's ImageFolder: a class folder that is a symlink counts; a link to nothing is listed."""
    _img(tmp_path / "elsewhere" / "cats" / "c.png")
    _img(tmp_path / "data" / "birds" / "b.png")
    (tmp_path / "data" / "cats").symlink_to(tmp_path / "elsewhere" / "cats")
    (tmp_path / "data" / "birds" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (tmp_path / "data" / "birds" / "loop").symlink_to(tmp_path / "data")  # each real folder is read once
    scan = scan_image_folder(tmp_path / "data")
    assert sorted((i.path.name, i.caption) for i in scan.items) == [("b.png", "birds"), ("c.png", "cats")]
    assert [(p.name, r) for p, r in scan.skipped] == [("gone.png", "a link whose target does not exist")]


def test_metadata_jsonl_takes_precedence_and_csv_is_read(tmp_path):
    _img(tmp_path / "x.png")
    (tmp_path / "x.txt").write_text("from the caption file")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "x.png", "text": "from metadata"}) + "\n")
    assert scan_image_folder(tmp_path).items[0].caption == "from metadata"
    other = tmp_path / "csv"
    _img(other / "y.png")
    (other / "metadata.csv").write_text("file_name,caption\ny.png,a csv caption\n")
    assert scan_image_folder(other).items[0].caption == "a csv caption"


def test_skip_report_lists_each_unusable_file_and_too_few_is_an_error(tmp_path, capsys):
    _img(tmp_path / "good.png")
    (tmp_path / "zero.jpg").write_bytes(b"")
    (tmp_path / "readme.md").write_text("hi")
    (tmp_path / "fake.png").write_text("text")
    scan = scan_image_folder(tmp_path)
    reasons = {p.name: r for p, r in scan.skipped}
    assert len(scan.items) == 1
    assert "empty file" in reasons["zero.jpg"] and "extension" in reasons["readme.md"]
    assert "not an image" in reasons["fake.png"]
    with pytest.raises(EgakuError, match=r"found 1 usable image, need at least 3"):
        scan_image_folder(tmp_path, min_images=3)
    assert "skipped zero.jpg: empty file" in capsys.readouterr().err  # the report, printed before the error


def test_bad_metadata_and_missing_folder_are_errors(tmp_path):
    with pytest.raises(EgakuError, match="does not exist"):
        scan_image_folder(tmp_path / "nope")
    _img(tmp_path / "x.png")
    (tmp_path / "metadata.jsonl").write_text("{broken\n")
    with pytest.raises(EgakuError, match="line 1 is not valid JSON"):
        scan_image_folder(tmp_path)



@pytest.mark.parametrize("caption", [["tag1", "tag2"], 3, None, {"en": "a dog"}])
def test_metadata_caption_that_is_not_a_string_is_an_error(tmp_path, caption):
    _img(tmp_path / "x.png")
    rows = [{"file_name": "x.png", "text": "a dog"}, {"file_name": "y.png", "text": caption}]
    _img(tmp_path / "y.png")
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    # str() would have trained on "['tag1', 'tag2']", "3", "None": the error names the file, line and value
    match = rf"metadata.jsonl line 2: the caption of 'y.png' is {re.escape(json.dumps(caption))}, not a string"
    with pytest.raises(EgakuError, match=match):
        scan_image_folder(tmp_path)


def test_metadata_csv_row_without_a_caption_value_is_an_error(tmp_path):
    _img(tmp_path / "x.png")
    (tmp_path / "metadata.csv").write_text("file_name,text\nx.png\n")
    with pytest.raises(EgakuError, match=r"metadata.csv line 2: the row of 'x.png' has no text value"):
        scan_image_folder(tmp_path)


@pytest.mark.skipif(not features.check("avif"), reason="this Pillow was built without AVIF")
def test_avif_images_are_read_when_pillow_decodes_them(tmp_path):
    Image.new("RGB", (16, 16), "blue").save(tmp_path / "photo.avif")
    scan = scan_image_folder(tmp_path)
    assert [i.path.name for i in scan.items] == ["photo.avif"] and not scan.skipped

def test_caption_files_in_other_encodings_are_decoded_and_the_report_says_how(tmp_path):
    files = {"sig": "\ufeffa dog, café".encode("utf-8"),  # Notepad's "UTF-8 with BOM"
             "wide": "a dog, café".encode("utf-16"),  # Notepad's "Unicode": UTF-16 with a BOM
             "wide_nobom": "a dog, café".encode("utf-16-le"),
             "legacy": b"a dog, caf\xe9",  # Windows-1252 / Latin-1
             "plain": "a dog, café".encode()}
    for name, data in files.items():
        _img(tmp_path / f"{name}.png")
        (tmp_path / f"{name}.txt").write_bytes(data)
    scan = scan_image_folder(tmp_path)
    assert {i.path.stem: i.caption for i in scan.items} == dict.fromkeys(files, "a dog, café")
    assert {p.name: enc for p, enc in scan.caption_encodings} == {
        "wide.txt": "UTF-16", "wide_nobom.txt": "UTF-16 without a BOM", "legacy.txt": "Windows-1252"}
    report = scan.report()
    assert "3 caption file(s) are not UTF-8" in report and "legacy.txt (Windows-1252)" in report
    assert "sig.txt" not in report and "plain.txt" not in report  # a UTF-8 BOM is still UTF-8


def test_decode_text_falls_back_without_losing_a_byte():
    from egaku.data.folder import decode_text

    assert decode_text(b"\x93quoted\x94") == ("\u201cquoted\u201d", "Windows-1252")
    assert decode_text(b"x\x81y") == ("x\x81y", "Latin-1")  # undefined in cp1252
    assert decode_text("\ufeffé".encode("utf-16-be")) == ("é", "UTF-16")
    assert decode_text(b"") == ("", "utf-8")


def test_a_caption_file_with_several_lines_gives_its_first_line_and_is_reported(tmp_path):
    _img(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes(b"a dog on a beach\r\nshot on film\r\n")
    _img(tmp_path / "b.png")
    (tmp_path / "b.caption").write_bytes(b"\r\n  a cat  \r\n\r\n")  # blank lines around one caption
    scan = scan_image_folder(tmp_path, trigger="sks")
    assert {i.path.name: i.caption for i in scan.items} == {"a.png": "sks, a dog on a beach", "b.png": "sks, a cat"}
    assert [p.name for p in scan.multiline_captions] == ["a.txt"]
    assert "1 caption file(s) have more than one line; only the first was used" in scan.report()


def test_caption_files_a_source_before_them_overrode_are_reported(tmp_path):
    """Precedence stays metadata, then .txt, then .caption; each file passed over is named with what was used."""
    _img(tmp_path / "dog" / "x.png")
    (tmp_path / "dog" / "x.txt").write_text("from the caption file")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "dog/x.png", "text": "from metadata"}) + "\n")
    _img(tmp_path / "dog" / "y.png")
    (tmp_path / "dog" / "y.txt").write_text("from txt")
    (tmp_path / "dog" / "y.caption").write_text("from caption")
    _img(tmp_path / "dog" / "z.png")
    (tmp_path / "dog" / "z.caption").write_text("only a caption file")  # one source: nothing to report
    scan = scan_image_folder(tmp_path)
    assert {i.path.name: i.caption for i in scan.items} == {
        "x.png": "from metadata", "y.png": "from txt", "z.png": "only a caption file"}
    assert [(p.name, used) for p, used in scan.overridden_captions] == [
        ("x.txt", "its metadata.jsonl row"), ("y.caption", "y.txt")]
    report = scan.report()
    assert "2 caption file(s) were not used" in report and "first of metadata, .txt, .caption" in report
    assert "dog/x.txt (used its metadata.jsonl row), dog/y.caption (used y.txt)" in report


def test_an_empty_caption_file_falls_back_to_the_next_source_and_is_reported(tmp_path):
    _img(tmp_path / "dog" / "a.png")
    (tmp_path / "dog" / "a.txt").write_text("   \n")  # kohya stops on this: "caption file is empty"
    _img(tmp_path / "dog" / "b.png")
    (tmp_path / "dog" / "b.txt").write_text("")
    (tmp_path / "dog" / "b.caption").write_text("a dog from the .caption file")
    _img(tmp_path / "root.png")
    (tmp_path / "root.txt").write_text("\n")  # no other source: an empty caption, as before
    scan = scan_image_folder(tmp_path, caption_template="a photo of {class}")
    assert {i.path.name: i.caption for i in scan.items} == {
        "a.png": "a photo of dog", "b.png": "a dog from the .caption file", "root.png": ""}
    report = scan.report()
    assert "2 caption file(s) are empty; the image's next caption source was used: " \
           "dog/a.txt (used the folder caption), dog/b.txt (used b.caption)" in report
    assert "1 image(s) got no caption" in report and "train on an empty caption: root.png; caption files beside " \
           "them (or train-lora's --trigger WORD)" in report
    assert "were not used" not in report  # an empty file is passed over, not overridden


def test_metadata_with_a_bom_is_read(tmp_path):
    _img(tmp_path / "y.png")
    (tmp_path / "metadata.csv").write_text("file_name,text\r\ny.png,a csv caption\r\n", encoding="utf-8-sig")
    assert scan_image_folder(tmp_path).items[0].caption == "a csv caption"
    (tmp_path / "metadata.csv").unlink()
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "y.png", "text": "café"}) + "\n",
                                             encoding="utf-8-sig")
    assert scan_image_folder(tmp_path).items[0].caption == "café"
    (tmp_path / "metadata.jsonl").write_bytes(b'{"file_name": "y.png", "text": "caf\xe9"}\n')
    with pytest.raises(EgakuError, match="metadata.jsonl is not UTF-8 .* save it as UTF-8"):
        scan_image_folder(tmp_path)


def test_metadata_rows_naming_no_image_and_uncaptioned_images_are_reported(tmp_path):
    for name in ("img0.png", "img1.png", "img2.png", "cat/img3.png"):
        _img(tmp_path / name)
    (tmp_path / "broken.png").write_bytes(b"")
    rows = [{"file_name": "IMG0.png", "text": "typo"}, {"file_name": "img1.png", "text": "a dog"},
            {"file_name": "gone.png", "text": "deleted"}, {"file_name": "broken.png", "text": "broken"}]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    scan = scan_image_folder(tmp_path, trigger="sks")
    assert {i.path.name: i.caption for i in scan.items} == {
        "img0.png": "sks", "img1.png": "sks, a dog", "img2.png": "sks", "img3.png": "sks, cat"}  # as before
    why = dict(scan.unused_rows)
    assert "img0.png matches when case is ignored" in why["IMG0.png"]
    assert why["gone.png"] == "no such file" and why["broken.png"].startswith("skipped: empty file")
    report = scan.report()
    assert "3 row(s) of metadata.jsonl name no usable image" in report
    assert "2 image(s) got no caption" in report and "train on the caption 'sks': img0.png, img2.png" in report
    # no row matching any image is an error naming the file, not a run on empty captions
    (tmp_path / "cat" / "img3.png").unlink()
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "IMG0.png", "text": "typo"}) + "\n")
    with pytest.raises(EgakuError, match=r"metadata.jsonl gives a caption to none of the 3 images .* IMG0.png"
                                         r".* names probably do not match"):
        scan_image_folder(tmp_path)


def test_report_names_at_most_a_few_images_and_counts_the_rest(tmp_path):
    for i in range(8):
        _img(tmp_path / f"{i}.png")
    (tmp_path / "0.txt").write_text("one caption")
    assert "7 image(s) got no caption" in (report := scan_image_folder(tmp_path).report())
    assert "train on an empty caption: 1.png, 2.png, 3.png, 4.png, 5.png and 2 more" in report


def test_trigger_is_added_unless_the_caption_holds_it_as_a_word(tmp_path):
    captions = {"a": "a hotdog stand", "b": "a dog", "c": "she asks", "d": "Dog, grass", "e": "dog-park"}
    for name, text in captions.items():
        _img(tmp_path / f"{name}.png")
        (tmp_path / f"{name}.txt").write_text(text)
    got = {i.path.stem: i.caption for i in scan_image_folder(tmp_path, trigger="dog").items}
    assert got == {"a": "dog, a hotdog stand", "b": "a dog", "c": "dog, she asks", "d": "Dog, grass",
                   "e": "dog-park"}
    assert scan_image_folder(tmp_path, trigger="sks").items[2].caption == "sks, she asks"
    assert scan_image_folder(tmp_path, trigger="<s>").items[0].caption == "<s>, a hotdog stand"


def test_a_caption_template_may_use_only_the_class_field(tmp_path):
    _img(tmp_path / "dog" / "a.png")
    with pytest.raises(EgakuError, match=r"--caption-template 'a \{class\} \{0\}' has the field \{0\}; "
                                         r"the template may use only \{class\}, remove it .*'\{\{' is no escape"):
        scan_image_folder(tmp_path, caption_template="a {class} {0}")
    with pytest.raises(EgakuError, match=r"has the field \{clas\}"):
        scan_image_folder(tmp_path, caption_template="a photo of {clas}", trigger="sks")  # a trigger does not excuse it
    with pytest.raises(EgakuError, match="has a stray brace"):
        scan_image_folder(tmp_path, caption_template="a {class} }")
    assert scan_image_folder(tmp_path, caption_template="{class}, a {class}").items[0].caption == "dog, a dog"


def test_too_few_images_says_what_to_change(tmp_path, capsys):
    _img(tmp_path / "good.png")
    (tmp_path / "zero.jpg").write_bytes(b"")
    with pytest.raises(EgakuError, match=r"need at least 4; add images to .*, or lower --min-images \(now 4\)$"):
        scan_image_folder(tmp_path, min_images=4)
    assert "skipped zero.jpg: empty file" in capsys.readouterr().err
    with pytest.raises(EgakuError, match=r"found 0 usable images, need at least 1; add images to \S+$"):
        scan_image_folder(_empty(tmp_path))


def _empty(tmp_path: Path) -> Path:
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty"


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


# ---- loss masks ------------------------------------------------------------------------------------

def test_alpha_channel_is_read_before_compositing(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    rgba.paste((255, 0, 0, 255), (0, 0, 4, 8))
    rgba.save(tmp_path / "half.png")
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.info["transparency"] = 1
    pal.save(tmp_path / "pal.png", transparency=1)
    Image.new("RGB", (8, 8)).save(tmp_path / "opaque.png")
    alpha = np.asarray(alpha_channel(decode_image(tmp_path / "half.png")))
    assert alpha[:, :4].min() == 255 and alpha[:, 4:].max() == 0
    assert np.asarray(alpha_channel(decode_image(tmp_path / "pal.png"))).max() == 0
    assert alpha_channel(decode_image(tmp_path / "opaque.png")) is None
    assert np.asarray(open_image(tmp_path / "half.png"))[:, 4:].min() == 255  # the RGB image is still on white


def test_mask_files_are_found_by_relative_path_and_any_extension_and_missing_ones_named(tmp_path):
    data, masks = tmp_path / "data", tmp_path / "masks"
    for rel in ("cat/a.jpg", "cat/b.jpg", "dog/c.png"):
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 8)).save(data / rel)
    (masks / "cat").mkdir(parents=True)
    Image.new("L", (16, 8), 255).save(masks / "cat" / "a.png")  # a JPEG's mask stored losslessly
    Image.new("L", (16, 8), 255).save(masks / "cat" / "b.jpg")
    scan = scan_image_folder(data)
    with pytest.raises(EgakuError, match=r"1 of 3 training images has no mask in .*: dog/c\.png"):
        find_mask_files(scan, masks)
    (masks / "dog").mkdir()
    Image.new("L", (16, 8), 255).save(masks / "dog" / "c.png")
    assert [p.relative_to(masks).as_posix() for p in find_mask_files(scan, masks)] == ["cat/a.png", "cat/b.jpg",
                                                                                       "dog/c.png"]
    with pytest.raises(EgakuError, match="--mask-dir 'nowhere' does not exist"):
        find_mask_files(scan, "nowhere")
    with pytest.raises(EgakuError, match="lies inside --data .* move the masks to a folder beside the data"):
        find_mask_files(scan, data / "cat")
    Image.new("L", (16, 8), 0).save(masks / "dog" / "c.jpg")  # two masks for one image: which is meant?
    with pytest.raises(EgakuError, match=r"2 masks in .* fit the image dog/c\.png: c\.png, c\.jpg; keep one"):
        find_mask_files(scan, masks)


def test_a_mask_is_its_red_channel_and_must_have_its_images_shape(tmp_path):
    Image.new("RGB", (16, 8), (128, 0, 255)).save(tmp_path / "rgb.png")
    Image.new("LA", (16, 8), (200, 0)).save(tmp_path / "grey_alpha.png")
    Image.fromarray(np.full((8, 16), 65535, dtype=np.uint16)).save(tmp_path / "deep.png")
    Image.new("L", (8, 8), 255).save(tmp_path / "square.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n")
    image = tmp_path / "image.png"
    assert np.asarray(load_mask(image, (16, 8), tmp_path / "rgb.png")).max() == 128
    assert np.asarray(load_mask(image, (32, 16), tmp_path / "grey_alpha.png")).min() == 200  # alpha not read
    assert np.asarray(load_mask(image, (16, 8), tmp_path / "deep.png")).min() == 255
    with pytest.raises(EgakuError, match=r"square\.png is 8x8 but its image .* is 16x8"):
        load_mask(image, (16, 8), tmp_path / "square.png")
    with pytest.raises(EgakuError, match=r"mask .*broken\.png: not an image file"):
        load_mask(image, (16, 8), tmp_path / "broken.png")


def test_latent_mask_is_cropped_flipped_and_pooled_as_its_image_is():
    rng = np.random.default_rng(0)
    mask = Image.fromarray(rng.integers(0, 256, (60, 100)).astype(np.uint8), "L")
    bucket = (64, 32)
    for flip in (False, True):
        got = latent_mask(mask, bucket, flip, factor=8)
        assert got.shape == (1, 4, 8)
        # the same crop and flip applied to an RGB image whose red channel is the mask
        red = (to_tensor(fit_to_bucket(mask.convert("RGB"), bucket), flip=flip)[:1] + 1) / 2
        want = red.reshape(1, 4, 8, 8, 8).mean(dim=(2, 4))
        assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(latent_mask(mask, bucket, False, 8), latent_mask(mask, bucket, True, 8))


def test_masked_mean_is_the_mean_over_the_mask():
    values = torch.rand(2, 4, 3, 3)
    weights = torch.zeros(2, 1, 3, 3)
    weights[:, :, 0] = 1  # the top row only
    spoiled = values.clone()
    spoiled[:, :, 1:] = 1e6  # what the mask leaves out does not count
    assert torch.allclose(masked_mean(spoiled, weights), values[:, :, 0].mean(dim=(1, 2)))
    assert torch.equal(masked_mean(values, torch.ones(2, 1, 3, 3)), values.mean(dim=(1, 2, 3)))
    # a mask's size does not change an image's share of the loss: the same error on 1 or 9 pixels weighs the same
    small = torch.zeros(1, 1, 3, 3)
    small[..., 1, 1] = 1
    assert torch.allclose(masked_mean(torch.full((1, 4, 3, 3), 2.0), small), torch.tensor([2.0]))


def test_vary_caption_keeps_the_leading_tags_and_shuffles_or_drops_only_the_rest():
    from egaku.data.captions import split_tags, vary_caption

    caption = "sks,  dog , sitting, grass, sunny, collar"
    assert split_tags(caption) == ["sks", "dog", "sitting", "grass", "sunny", "collar"]
    assert split_tags("  ") == []
    seen = set()
    for seed in range(30):
        varied = vary_caption(caption, shuffle=True, keep_tokens=2, generator=torch.Generator().manual_seed(seed))
        tags = varied.split(", ")
        assert tags[:2] == ["sks", "dog"] and sorted(tags[2:]) == ["collar", "grass", "sitting", "sunny"]
        seen.add(varied)
    assert len(seen) > 5  # 24 orders of the four free tags
    # the same generator state gives the same caption (resume replays a step's captions)
    assert vary_caption(caption, True, 1, 0.3, torch.Generator().manual_seed(7)) == \
           vary_caption(caption, True, 1, 0.3, torch.Generator().manual_seed(7))
    # without shuffling the order stays; dropout removes only free tags, about as often as asked
    lengths = []
    for seed in range(200):
        tags = vary_caption(caption, False, 1, 0.5, torch.Generator().manual_seed(seed)).split(", ")
        assert tags[0] == "sks" and tags[1:] == [t for t in split_tags(caption)[1:] if t in tags[1:]]
        lengths.append(len(tags) - 1)
    assert 2.0 < np.mean(lengths) < 3.0  # 5 free tags kept with probability 0.5
    assert vary_caption(caption, False, 6, 0.9) == ", ".join(split_tags(caption))  # every tag held
    assert vary_caption("", True, 0, 0.5) == ""


def test_tag_frequency_counts_tags_lower_cased():
    from egaku.data.captions import tag_frequency

    assert tag_frequency(["sks, Dog, grass", "sks, dog", "", "a photo of sks"]) == \
           {"sks": 2, "dog": 2, "grass": 1, "a photo of sks": 1}


def test_kohya_folder_names_give_repeats_and_the_class(tmp_path):
    for folder in ("10_sks dog", "2_red_star"):
        (tmp_path / "data" / folder).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (16, 16), "red").save(tmp_path / "data" / folder / f"{i}.png")
    (tmp_path / "data" / "2_red_star" / "1.txt").write_text("a red star, drawn")
    # only where asked for (LoRA training): elsewhere "0_airplane" is a class name
    assert {i.label for i in scan_image_folder(tmp_path / "data").items} == {"10_sks dog", "2_red_star"}
    scan = scan_image_folder(tmp_path / "data", caption_template="a photo of {class}", kohya_names=True)
    by_path = {item.path.relative_to(tmp_path / "data").as_posix(): item for item in scan.items}
    assert {k: (v.caption, v.label, v.repeats) for k, v in by_path.items()} == {
        "10_sks dog/0.png": ("a photo of sks dog", "sks dog", 10),
        "10_sks dog/1.png": ("a photo of sks dog", "sks dog", 10),
        "2_red_star/0.png": ("a photo of red star", "red_star", 2),
        "2_red_star/1.png": ("a red star, drawn", "red_star", 2),  # a caption file still wins
    }
    assert "10_sks dog -> 10 repeat(s) of class 'sks dog'" in scan.report()
    # a plain ImageFolder is untouched
    plain = scan_image_folder(tmp_path / "data" / "10_sks dog", kohya_names=True)
    assert all(item.repeats == 1 for item in plain.items)
    # a mix of named and plain class folders, or a 0 count, is refused naming the folders
    (tmp_path / "data" / "cats").mkdir()
    Image.new("RGB", (16, 16), "blue").save(tmp_path / "data" / "cats" / "0.png")
    with pytest.raises(EgakuError, match=r"10_sks dog, 2_red_star are named kohya's way .* but cats not"):
        scan_image_folder(tmp_path / "data", kohya_names=True)
    (tmp_path / "data" / "cats" / "0.png").rename(tmp_path / "data" / "0.png")  # images at the root are fine
    (tmp_path / "data" / "cats").rmdir()
    assert {i.repeats for i in scan_image_folder(tmp_path / "data", kohya_names=True).items if i.label is None} == {1}
    (tmp_path / "data" / "10_sks dog").rename(tmp_path / "data" / "0_sks dog")
    with pytest.raises(EgakuError, match="0_sks dog ask for 0 repeats"):
        scan_image_folder(tmp_path / "data", kohya_names=True)


def test_the_report_shows_the_captions_training_reads(tmp_path):
    """The first caption of each class (or the first images of a flat folder), as the template and trigger made
    them, so that a wrong template is seen before the run is spent."""
    for cls in ("red_star", "blue_star", "cat", "dog"):
        for name in ("a", "b"):
            _img(tmp_path / "classes" / cls / f"{name}.png")
    report = scan_image_folder(tmp_path / "classes", caption_template="a photo of {class}", trigger="sks").report()
    assert ("  captions (the first image of each class): blue_star/a.png: 'sks, a photo of blue star'; "
            "cat/a.png: 'sks, a photo of cat'; dog/a.png: 'sks, a photo of dog' and 1 more") in report
    for name in ("x", "y"):
        _img(tmp_path / "flat" / f"{name}.png")
        (tmp_path / "flat" / f"{name}.txt").write_text(f"a drawing of {name}")
    report = scan_image_folder(tmp_path / "flat").report()
    assert "  captions (the first images): x.png: 'a drawing of x'; y.png: 'a drawing of y'\n" in report + "\n"
