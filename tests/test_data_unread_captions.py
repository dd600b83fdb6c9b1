"""Data folders as kohya and diffusers users bring them: captions and metadata that would otherwise be passed over
without a word."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from egaku.data.folder import scan_image_folder
from egaku.data.masks import find_mask_files
from egaku.errors import EgakuError


def _img(path: Path, size=(16, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, "blue").save(path)
    return path


def test_a_metadata_file_that_captions_no_image_is_an_error_even_where_class_folders_caption_them(tmp_path):
    """docs/lora.md: a metadata file that matches no image at all is an error. With class folders every image has
    the folder's caption, and the run trained on the folder names instead of the file's captions."""
    for i in range(2):
        _img(tmp_path / "10_sks dog" / f"{i}.png")
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i}.png", "text": f"cap {i}"}) + "\n"
                                                     for i in range(2)))
    with pytest.raises(EgakuError, match=r"metadata.jsonl gives a caption to none of the 2 images .* the images are "
                                         r"10_sks dog/0.png, 10_sks dog/1.png\); the names probably do not match"):
        scan_image_folder(tmp_path, kohya_names=True)


def test_metadata_paths_written_with_backslashes_name_their_images(tmp_path):
    """A metadata file written on Windows ("10_sks dog\\0.png") captions the same images on Linux."""
    for i in range(2):
        _img(tmp_path / "10_sks dog" / f"{i}.png")
    (tmp_path / "metadata.csv").write_text("file_name,text\n10_sks dog\\0.png,first\n10_sks dog\\1.png,second\n")
    scan = scan_image_folder(tmp_path, kohya_names=True)
    assert {i.path.name: i.caption for i in scan.items} == {"0.png": "first", "1.png": "second"}
    assert not scan.unused_rows


def test_caption_files_no_image_reads_and_metadata_below_the_root_are_reported(tmp_path):
    """img.TXT (read on Windows, not on Linux), img.png.txt (some taggers' name) and a metadata file in a class
    folder were passed over without a word, and their images trained on the folder caption."""
    for name in ("a", "b", "c", "d"):
        _img(tmp_path / "5_dog" / f"{name}.png")
    (tmp_path / "5_dog" / "a.TXT").write_text("upper-case extension")
    (tmp_path / "5_dog" / "b.png.txt").write_text("double extension")
    (tmp_path / "5_dog" / "gone.txt").write_text("its image was deleted")
    (tmp_path / "5_dog" / "c.txt").write_text("read")  # an image's own caption file is not listed
    (tmp_path / "5_dog" / "metadata.jsonl").write_text(json.dumps({"file_name": "d.png", "text": "x"}) + "\n")
    scan = scan_image_folder(tmp_path, kohya_names=True)
    assert {i.path.name: i.caption for i in scan.items} == {"a.png": "dog", "b.png": "dog", "c.png": "read",
                                                           "d.png": "dog"}
    report = scan.report()
    assert ("3 caption file(s) belong to no image and were not read (an image's caption file has its name with .txt "
            "or .caption in place of the image's extension): 5_dog/a.TXT (the extension is case-sensitive: rename it "
            "to a.txt), 5_dog/b.png.txt (the caption file of b.png is b.txt), 5_dog/gone.txt (no image of that name)"
            ) in report
    assert ("1 metadata file(s) below the data folder's root were not read (only the root's is); move their rows "
            "into the root's, file_name relative to the root: 5_dog/metadata.jsonl") in report
    # a plain, fully read folder says none of it
    (tmp_path / "5_dog" / "metadata.jsonl").unlink()
    for name in ("a.TXT", "b.png.txt", "gone.txt"):
        (tmp_path / "5_dog" / name).unlink()
    report = scan_image_folder(tmp_path, kohya_names=True).report()
    assert "belong to no image" not in report and "were not read" not in report


def test_masks_laid_out_as_kohya_lays_them_are_pointed_to_their_sub_folders(tmp_path):
    """kohya's conditioning_data_dir holds a subset's masks side by side; a user who brings that folder is told
    where the masks go, not only that they are missing."""
    for i in range(2):
        _img(tmp_path / "data" / "10_sks dog" / f"{i}.png")
        Image.new("L", (16, 16), 255).save(_img(tmp_path / "masks" / f"{i}.png"))
    scan = scan_image_folder(tmp_path / "data", kohya_names=True)
    with pytest.raises(EgakuError, match=r"2 of 2 training images have no mask in .*: 10_sks dog/0.png, 10_sks dog/"
                                         r"1.png; 2 of them have a mask of their name at the top of .*masks \(kohya's "
                                         r"layout\): move those into the sub-folders of their images, as .*masks/"
                                         r"10_sks dog/0.png\. Add their masks"):
        find_mask_files(scan, tmp_path / "masks")
    for i in range(2):
        (tmp_path / "masks" / f"{i}.png").rename(_img(tmp_path / "masks" / "10_sks dog" / f"{i}.png"))
    assert [p.name for p in find_mask_files(scan, tmp_path / "masks")] == ["0.png", "1.png"]


def test_a_data_folder_that_is_itself_a_kohya_class_folder_is_reported(tmp_path):
    """`--data "train/10_sks dog"` (kohya reads the repeats from folders inside train_data_dir) trained each image
    once per epoch without a word."""
    for i in range(2):
        _img(tmp_path / "train" / "10_sks dog" / f"{i}.png")
    scan = scan_image_folder(tmp_path / "train" / "10_sks dog", kohya_names=True)
    assert {i.repeats for i in scan.items} == {1}
    assert ("the folder's own name '10_sks dog' is a kohya folder name, which is read from the class folders inside "
            "--data: its images train once per epoch, not 10 times, with no class 'sks dog'; give its parent folder "
            "as --data") in scan.report()
    # its parent, or the folder where kohya names are not read (GAN and LDM training), says nothing of it
    assert "kohya folder name," not in scan_image_folder(tmp_path / "train", kohya_names=True).report()
    assert "kohya folder name," not in scan_image_folder(tmp_path / "train" / "10_sks dog").report()
