"""The shapes judge (trained small here, shipped at full scale) and the adherence evaluation."""

import json

import numpy as np
import pytest
import torch

from egaku.data import shapes
from egaku.data.images import arrays_to_tensor
from egaku.errors import EgakuError, NotFoundError
from egaku.evaluation import adherence, judges


@pytest.fixture(scope="module")
def small_judge(tmp_path_factory):
    torch.manual_seed(0)
    opts = judges.JudgeOptions(train_images=1500, test_images=300, steps=200, batch_size=32, lr=5e-3, width=8,
                               threads=1)
    judge, report = judges.train_shapes_judge(opts, progress=False)
    path = judges.save_judge(judge, tmp_path_factory.mktemp("judge") / "judge", report, opts)
    return judge, report, path


def test_small_judge_learns_every_attribute(small_judge):
    _, report, _ = small_judge
    acc = report["test_accuracy"]
    assert set(acc) == set(shapes.ATTRIBUTES)
    # a few seconds of training: colour, size, position and background are read almost perfectly,
    # shape is on its way (the shipped judge is checked at full accuracy below)
    for name in ("colour", "size", "position", "background"):
        assert acc[name] > 0.95, (name, acc[name])
    assert acc["shape"] > 1.5 / len(shapes.SHAPES), acc["shape"]


def test_judge_round_trips_through_safetensors(small_judge):
    judge, report, path = small_judge
    assert (path / "diffusion_pytorch_model.safetensors").is_file()
    assert json.loads((path / "report.json").read_text()) == json.loads(json.dumps(report))
    images, _ = shapes.make_dataset(16, seed=5, split="all")
    x = arrays_to_tensor(images)
    before, feats_before = judge.predict(x)
    after, feats_after = judges.load_judge(path).predict(x)
    assert all(np.array_equal(before[k], after[k]) for k in before)
    np.testing.assert_allclose(feats_before, feats_after, rtol=1e-5, atol=1e-5)


def test_missing_judge_is_a_clear_error(tmp_path):
    with pytest.raises(NotFoundError, match="no shapes judge"):
        judges.load_judge(tmp_path / "nothing")


def test_shipped_judge_reads_fresh_renders_at_99_percent():
    report = json.loads((judges.BUILTIN_JUDGE / "report.json").read_text())
    assert min(report["test_accuracy"].values()) >= 0.99
    accuracy = judges.evaluate_judge(judges.load_judge(), n=300, seed=424242)
    assert min(accuracy.values()) >= 0.98, accuracy


def test_score_counts_attributes_and_all_at_once():
    specs = shapes.sample_attributes(4, seed=1, split="train")
    truth = judges.label_arrays(specs)
    preds = {k: v.copy() for k, v in truth.items()}
    preds["colour"][0] = (preds["colour"][0] + 1) % len(shapes.COLOURS)
    preds["shape"][0] = (preds["shape"][0] + 1) % len(shapes.SHAPES)
    preds["size"][1] = 1 - preds["size"][1]
    result = adherence.score(preds, specs)
    assert result["per_attribute"]["colour"] == 0.75
    assert result["per_attribute"]["size"] == 0.75
    assert result["per_attribute"]["position"] == 1.0
    assert result["all_attributes"] == 0.5
    sizes = [s.size for s in specs]
    wrong_shape_size = sizes[0]
    expected = {size: (sizes.count(size) - (size == wrong_shape_size)) / sizes.count(size) for size in set(sizes)}
    assert result["shape_by_size"] == pytest.approx(expected)
    # per (size, shape) and per background: only image 0's shape is wrong
    groups = {}
    for i, spec in enumerate(specs):
        groups.setdefault(f"{spec.size} {spec.shape}", []).append(i != 0)
    assert result["shape_by_shape"] == pytest.approx({k: sum(v) / len(v) for k, v in groups.items()})
    backgrounds = [s.background for s in specs]
    assert result["shape_by_background"] == pytest.approx(
        {b: (backgrounds.count(b) - (b == backgrounds[0])) / backgrounds.count(b) for b in set(backgrounds)})
    # the one wrong shape is listed under its prompted shape, as what it was read as
    read_as = shapes.SHAPES[(shapes.SHAPES.index(specs[0].shape) + 1) % len(shapes.SHAPES)]
    assert result["shape_read_as"] == {specs[0].shape: {read_as: 1}}


def test_prompt_sets_are_fixed_and_split_correctly():
    seen = adherence.prompt_set("seen", 30)
    assert seen == adherence.prompt_set("seen", 30)
    assert not any(s.held_out or s.shape == "star" for s in seen)
    assert all(s.held_out for s in adherence.prompt_set("held_out", 30))
    assert {s.shape for s in adherence.prompt_set("star", 10)} == {"star"}
    with pytest.raises(EgakuError, match="unknown split"):
        adherence.prompt_set("everything", 3)


class _RenderingPipeline:
    """Stands in for a perfect text-to-image model: draws exactly what the caption says."""


def test_a_perfect_generator_scores_full_marks(monkeypatch):
    def render_prompts(pipe, prompts, *args, **kwargs):
        return [shapes.render(shapes.parse_caption(p)) for p in prompts]

    monkeypatch.setattr(adherence, "generate_images", render_prompts)
    result = adherence.measure_concept(_RenderingPipeline(), shape="star", n=12)
    assert result["all_attributes"] == 1.0 and result["n"] == 12


def test_concept_prompts_can_emphasise_the_shape_word():
    specs, plain = adherence.concept_prompts("star", 6)
    same_specs, weighted = adherence.concept_prompts("star", 6, shape_weight=1.3)
    assert specs == same_specs  # the same attribute sets, only the word written otherwise
    assert weighted == [p.replace("star", "(star:1.3)") for p in plain]
    assert all(p.count("(star:1.3)") == 1 for p in weighted)
    _, two_words = adherence.concept_prompts("star", 6, shape_text="star q")  # a two-vector word's tokens
    assert two_words == [p.replace("star", "star q") for p in plain]
    _, two_weighted = adherence.concept_prompts("star", 6, shape_weight=1.5, shape_text="star q")
    assert two_weighted == [p.replace("star", "(star q:1.5)") for p in plain]


def test_evaluation_prompts_are_read_with_a1111_emphasis_and_past_77_tokens(tiny_model_dir):
    from egaku.models.loading import load_pipeline

    pipe = load_pipeline(str(tiny_model_dir), device="cpu", dtype="float32")

    def pixels(prompts):
        return [np.asarray(im, dtype=np.float64) for im in adherence.generate_images(pipe, prompts, steps=2, batch_size=2)]

    plain = pixels(["a red circle", "a blue square"])
    weight_one = pixels(["a red circle", "a blue (square:1)"])  # emphasis syntax at weight 1: the same text
    emphasised = pixels(["a red circle", "a blue (square:3)"])
    assert np.array_equal(weight_one[1], plain[1])  # the embeddings path draws what the pipeline's own does
    assert np.array_equal(emphasised[0], plain[0])  # the weight is the second prompt's alone
    assert np.abs(emphasised[1] - plain[1]).mean() > 0.5  # (the tiny model's images follow its text weakly)
    long_prompt = "a blue square " + ", ".join(["on a plain background"] * 20)
    assert len(pipe.tokenizer(long_prompt).input_ids) > pipe.tokenizer.model_max_length
    mixed = pixels(["a red circle", long_prompt])  # one chunk beside two: drawn one by one, same seeds
    assert np.abs(mixed[0] - plain[0]).max() <= 2
    assert np.abs(mixed[1] - plain[1]).mean() > 0.5


def test_eval_adherence_command_writes_its_report(tiny_model_dir, small_judge, tmp_path, capsys):
    _, _, judge_path = small_judge
    out = tmp_path / "adherence.json"
    opts = adherence.AdherenceOptions(model=str(tiny_model_dir), judge=str(judge_path), out=str(out),
                                      seen_prompts=3, held_out_prompts=2, star_prompts=2, steps=2,
                                      batch_size=4, threads=1)
    adherence.eval_adherence_command(opts)
    report = json.loads(out.read_text())
    assert report["seen"]["n"] == 3 and report["held_out"]["n"] == 2 and report["star"]["n"] == 2
    for split in ("seen", "held_out", "star"):
        assert 0.0 <= report[split]["all_attributes"] <= min(report[split]["per_attribute"].values()) <= 1.0
    fd = report["frechet_distance"]
    assert fd["generated_vs_real"] >= 0 and fd["real_vs_real"] >= 0
    assert report["judge_accuracy_on_renders"] == json.loads((judge_path / "report.json").read_text())["test_accuracy"]
    assert out.with_suffix(".png").is_file()
    assert report["settings"]["steps"] == 2
