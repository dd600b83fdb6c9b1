"""The data report as the user reads it: above a data error, with the repeats training uses, in plain English."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from egaku.cli import main
from egaku.data.folder import scan_image_folder
from egaku.errors import EgakuError


def _img(path: Path, size=(16, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, "blue").save(path)
    return path


def _four_dogs(root: Path) -> Path:
    for i in range(4):
        _img(root / "dog" / f"{i}.png")
    return root


def _metadata_of_no_image(root: Path) -> list[str]:
    (_four_dogs(root) / "metadata.csv").write_text("file_name,text\nnope.png,a caption\n")
    return []


def _too_few_for_min_images(root: Path) -> list[str]:
    _four_dogs(root)
    return ["--min-images", "10"]


@pytest.mark.parametrize("make_data", [_metadata_of_no_image, _too_few_for_min_images])
def test_a_train_lora_data_error_is_the_last_line_with_the_report_above_it(tmp_path, capsys, make_data):
    """README: bad input ends with one line that says what to change; the report that explains it comes first."""
    extra = make_data(tmp_path / "data")
    code = main(["train-lora", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out"), "--max-steps", "1",
                 "--resolution", "32", "--no-progress", *extra])
    lines = capsys.readouterr().err.splitlines()
    assert code == 2
    assert lines[-1].startswith("egaku: error: ") and sum(line.startswith("egaku: error:") for line in lines) == 1
    assert f"{tmp_path / 'data'}: 4 images used, 0 skipped" in lines[:-1]
    assert "  classes: dog (4)" in lines[:-1]


def test_a_train_gan_folder_of_no_images_errors_last_with_the_report_above_it(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "readme.md").write_text("hi")
    code = main(["train-gan", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out")])
    lines = capsys.readouterr().err.splitlines()
    assert code == 2
    assert lines[-1].startswith("egaku: error: ") and lines[-1].endswith("or use --data digits")
    assert "  skipped readme.md: not an image file extension (.md)" in lines[:-1]


def test_kohya_folder_repeats_are_reported_as_multiplied_by_the_repeats_option(tmp_path):
    """ss_dataset_dirs says n_repeats 20 for 10_sks dog with --repeats 2, and so must the report."""
    for i in range(2):
        _img(tmp_path / "data" / "10_sks dog" / f"{i}.png")
    scan = scan_image_folder(tmp_path / "data", kohya_names=True)
    assert "10_sks dog -> 10 repeat(s) of class 'sks dog'" in scan.report()
    assert "10_sks dog -> 10 x --repeats 2 = 20 repeat(s) of class 'sks dog'" in scan.report(repeats=2)
    # and so does the run's data_report.txt
    code = main(["train-lora", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out"), "--repeats", "2",
                 "--min-images", "1", "--model", "tiny", "--max-steps", "1", "--resolution", "32", "--no-progress",
                 "--format", "diffusers"])
    assert code == 0
    assert "10_sks dog -> 10 x --repeats 2 = 20 repeat(s) of class 'sks dog'" in \
           (tmp_path / "out" / "data_report.txt").read_text()


def test_counts_of_one_are_singular(tmp_path, capsys):
    _img(tmp_path / "a.png")
    assert scan_image_folder(tmp_path).report().startswith(f"{tmp_path}: 1 image used, 0 skipped")
    with pytest.raises(EgakuError, match="found 1 usable image, need at least 2;"):
        scan_image_folder(tmp_path, min_images=2)
    (tmp_path / "metadata.csv").write_text("file_name,text\nb.png,a caption\n")
    with pytest.raises(EgakuError, match="gives a caption to none of the 1 image in"):
        scan_image_folder(tmp_path)
