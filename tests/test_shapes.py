import numpy as np
import pytest

from egaku.data import shapes


def test_dataset_is_deterministic_by_seed():
    a, specs_a = shapes.make_dataset(12, seed=3)
    b, specs_b = shapes.make_dataset(12, seed=3)
    c, _ = shapes.make_dataset(12, seed=4)
    assert a.shape == (12, 64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and specs_a == specs_b
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("split", ["novel", "train"])
def test_balanced_sampling_covers_every_value_and_pair_about_equally(split):
    import dataclasses
    from collections import Counter

    specs = shapes.sample_attributes(20, seed=11, split=split, balanced=True)
    assert specs == shapes.sample_attributes(20, seed=11, split=split, balanced=True)  # deterministic by seed
    pool = shapes.training_specs() if split == "train" else shapes.all_specs(shapes.NOVEL_SHAPES)
    assert all(dataclasses.replace(s, dx=0.0, dy=0.0, angle=0.0) in pool for s in specs)  # from the split only
    for name, values in shapes.ATTRIBUTES.items():
        counts = Counter(getattr(s, name) for s in specs)
        present = [v for v in values if any(getattr(p, name) == v for p in pool)]
        # 20 over k values: each value floor(20/k) or ceil(20/k) times (the 20 independent draws of seed 11 held
        # 6 small stars against 14 large, and no orange one)
        assert set(counts) == set(present), name
        assert max(counts.values()) - min(counts.values()) <= 1, (name, counts)
    pairs = Counter((s.size, s.background) for s in specs)
    assert len(pairs) == 8 and max(pairs.values()) - min(pairs.values()) <= 1, pairs
    independent = Counter(s.size for s in shapes.sample_attributes(20, seed=11, split="novel"))
    assert independent["small"] == 6  # what balancing is for


def _foreground(img: np.ndarray, background: str) -> np.ndarray:
    return np.abs(img.astype(int) - np.array(shapes.BACKGROUNDS[background])).sum(-1) > 60


@pytest.mark.parametrize("split", ["train", "held_out", "novel"])
def test_captions_match_pixels(split):
    images, specs = shapes.make_dataset(40, seed=11, split=split)
    for img, spec in zip(images, specs):
        cx, cy = shapes.POSITIONS[spec.position]
        cx, cy = cx + spec.dx, cy + spec.dy
        # the shape's own colour at its centre, the background colour in the farthest corner
        assert np.abs(img[round(cy), round(cx)].astype(int) - shapes.COLOURS[spec.colour]).max() <= 3, spec
        far = (0 if cy > 32 else 63, 0 if cx > 32 else 63)
        assert np.abs(img[far].astype(int) - shapes.BACKGROUNDS[spec.background]).max() <= 3, spec
        # the drawn pixels sit around the stated position and span the stated size
        ys, xs = np.nonzero(_foreground(img, spec.background))
        assert abs(xs.mean() - cx) < 4 and abs(ys.mean() - cy) < 4, spec
        extent = max(xs.max() - xs.min(), ys.max() - ys.min()) + 1
        r = shapes.SIZES[spec.size]
        assert 1.2 * r < extent <= 2.2 * r + 2, (spec, extent)  # a rotated cross reaches past r
        # the caption states exactly these attributes
        assert spec.caption == shapes.caption_for(spec.shape, spec.colour, spec.size, spec.position, spec.background)
        assert shapes.parse_caption(spec.caption).labels() == spec.labels()


def test_held_out_pairs_and_star_never_in_training():
    train = shapes.sample_attributes(3000, seed=0, split="train")
    pairs = {(s.colour, s.shape) for s in train}
    assert not pairs & shapes.HELD_OUT_PAIRS
    assert "star" not in {s.shape for s in train}
    # every training colour, shape, size, position and background still appears
    for name, values in shapes.ATTRIBUTES.items():
        expected = set(values) - ({"star"} if name == "shape" else set())
        assert {getattr(s, name) for s in train} == expected
    held = shapes.sample_attributes(200, seed=0, split="held_out")
    assert {(s.colour, s.shape) for s in held} == set(shapes.HELD_OUT_PAIRS)
    assert {s.shape for s in shapes.sample_attributes(50, seed=0, split="novel")} == {"star"}


def test_caption_grammar_and_vocabulary():
    spec = shapes.ShapeSpec("triangle", "red", "small", "top left", "navy")
    assert spec.caption == "a small red triangle at the top left on a navy background"
    assert shapes.ShapeSpec("star", "blue", "large", "center", "white").caption == \
        "a large blue star in the center on a white background"
    assert shapes.parse_caption("a purple dog in a hat") is None
    words = set(" ".join(shapes.vocabulary_captions()).split())
    assert {"star", "navy", "center", "triangle"} <= words


def test_shapes_are_distinct_renders():
    base = dict(colour="red", size="large", position="center", background="white")
    renders = {s: shapes.render(shapes.ShapeSpec(s, **base)) for s in shapes.SHAPES}
    arrays = [np.asarray(r) for r in renders.values()]
    for i in range(len(arrays)):
        for j in range(i + 1, len(arrays)):
            assert np.abs(arrays[i].astype(int) - arrays[j]).sum() > 0


def test_unknown_attribute_is_refused():
    with pytest.raises(ValueError, match="unknown colour"):
        shapes.render(shapes.ShapeSpec("circle", "teal", "small", "center", "white"))
    with pytest.raises(ValueError, match="unknown split"):
        shapes.sample_attributes(2, seed=0, split="everything")


def test_caption_folder_is_what_train_lora_reads(tmp_path):
    """write_caption_folder writes images and a diffusers metadata.jsonl the LoRA data loader accepts."""
    from egaku.data.folder import scan_image_folder

    specs = shapes.sample_attributes(5, seed=3, split="novel")
    assert shapes.write_caption_folder(specs, tmp_path / "stars", size=32, prefix="star") == 5
    scan = scan_image_folder(tmp_path / "stars")
    assert sorted(i.caption for i in scan.items) == sorted(s.caption for s in specs) and not scan.skipped


def test_shape_masks_cover_the_shape_and_are_what_mask_dir_reads(tmp_path):
    """render_mask is white where render draws the shape and black on its background; write_caption_folder puts
    each mask under its image's name, where --mask-dir finds it."""
    from egaku.data.folder import scan_image_folder
    from egaku.data.masks import find_mask_files

    for spec in shapes.sample_attributes(6, seed=5, split="novel"):
        image = np.asarray(shapes.render(spec)).astype(int)
        mask = np.asarray(shapes.render_mask(spec))
        background = np.array(shapes.BACKGROUNDS[spec.background])
        on_shape = np.abs(image - background).max(axis=2) > 0
        assert (mask[~on_shape] == 0).all() and (mask[on_shape] > 0).all()
        assert (mask == 255).sum() > 0.5 * on_shape.sum()  # solid inside, grey only along the edge
    specs = shapes.sample_attributes(3, seed=3, split="novel")
    shapes.write_caption_folder(specs, tmp_path / "stars", size=32, prefix="star", mask_folder=tmp_path / "masks")
    found = find_mask_files(scan_image_folder(tmp_path / "stars"), tmp_path / "masks")
    assert [p.name for p in found] == ["star-000.png", "star-001.png", "star-002.png"]
