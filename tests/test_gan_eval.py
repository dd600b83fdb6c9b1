"""`eval gan`: the digit judge and the GAN metrics on inputs whose answer is known."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from egaku.config import build
from egaku.data.digits import load_digits_split
from egaku.errors import EgakuError
from egaku.evaluation import gan_eval
from egaku.evaluation.gan_eval import (EvalGanOptions, JudgeRecipe, collapse_warning, eval_gan_command,
                                       noise_floor, real_reference, score_samples, train_digit_classifier)
from egaku.gan.models import build_gan

# a quick judge for unit tests; the shipped recipe (JudgeRecipe()) is checked in the slow test below
QUICK = JudgeRecipe(width=16, feature_dim=32, epochs=8)


@pytest.fixture(scope="module")
def quick_judge():
    return train_digit_classifier(QUICK, log=lambda *_: None)


def test_real_digits_score_high_and_noise_scores_low(quick_judge):
    judge, accuracy = quick_judge
    assert accuracy > 0.85
    reference, ceiling = real_reference(judge, 500)
    floor = noise_floor(judge, reference, 500)
    assert ceiling["conditional_accuracy"] == pytest.approx(accuracy)
    assert ceiling["class_coverage"] > 0.97  # the held-out split has every digit about equally
    assert ceiling["confident_fraction"] > floor["confident_fraction"] + 0.3
    assert floor["class_coverage"] < 0.7
    assert floor["conditional_accuracy"] < 0.3  # random requests on noise: about chance
    assert floor["frechet_distance"] > 10 * ceiling["frechet_distance"]


def test_one_repeated_digit_is_flagged_as_collapse(quick_judge):
    judge, _ = quick_judge
    test = load_digits_split("test", 28)
    reference, _ = real_reference(judge, 300)
    sevens = test.images[test.labels == 7]
    collapsed = score_samples(judge, sevens.repeat(4, 1, 1, 1), reference, requested=torch.full((4 * len(sevens),), 7))
    assert collapsed["class_coverage"] < 0.3
    assert collapsed["conditional_accuracy"] > 0.8
    assert collapsed["frechet_distance"] > 3 * score_samples(judge, test.images, reference)["frechet_distance"]
    warning = collapse_warning(collapsed, 0.9)
    assert warning and "7 (" in warning
    assert collapse_warning({"class_coverage": 0.99, "predicted_counts": [1] * 10}, 0.9) is None


def test_eval_gan_command_writes_the_report(quick_judge, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gan_eval, "load_or_train_judge", lambda *a, **k: quick_judge)
    gen, _ = build_gan("mlp", image_size=8, class_names=[str(d) for d in range(10)])
    gen.save_pretrained(tmp_path / "model" / "generator")
    eval_gan_command(build(EvalGanOptions, {"model": str(tmp_path / "model"), "n": 200}))
    report = json.loads((tmp_path / "model" / "eval-gan.json").read_text())
    samples = report["samples"]
    assert samples["n"] == 200 and 0 <= samples["confident_fraction"] <= 1
    # an untrained generator makes noise-like blobs: far from real digits, about chance when asked a digit
    assert samples["frechet_ratio_to_real"] > 5
    assert samples["conditional_accuracy"] < 0.5
    assert report["real_digits"]["conditional_accuracy"] > 0.85
    assert "judge held-out accuracy" in capsys.readouterr().out


def test_eval_gan_refuses_models_of_other_classes(quick_judge, tmp_path, monkeypatch):
    monkeypatch.setattr(gan_eval, "load_or_train_judge", lambda *a, **k: quick_judge)
    gen, _ = build_gan("mlp", image_size=8, class_names=["cat", "dog"])
    gen.save_pretrained(tmp_path / "pets" / "generator")
    with pytest.raises(EgakuError, match="judges handwritten digits.*cat"):
        eval_gan_command(build(EvalGanOptions, {"model": str(tmp_path / "pets"), "n": 20}))
    with pytest.raises(EgakuError, match="needs --model"):
        eval_gan_command(build(EvalGanOptions, {}))


@pytest.mark.parametrize("channels, class_names, message", [
    (1, ["cat", "dog"], r"judges handwritten digits, but .*classes are \['cat', 'dog'\]"),
    (3, None, r"unconditional model of 3-channel images, which are not the digits"),
])
def test_eval_gan_refuses_a_model_it_cannot_judge_before_training_the_judge(tmp_path, monkeypatch, channels,
                                                                             class_names, message):
    def judge_first(*args, **kwargs):
        raise AssertionError("the judge was trained or loaded before the model was checked")

    monkeypatch.setattr(gan_eval, "load_or_train_judge", judge_first)
    gen, _ = build_gan("dcgan", image_size=8, channels=channels, class_names=class_names)
    gen.save_pretrained(tmp_path / "model" / "generator")
    with pytest.raises(EgakuError, match=message):
        eval_gan_command(build(EvalGanOptions, {"model": str(tmp_path / "model"), "n": 20}))


@pytest.mark.slow
def test_shipped_judge_recipe_reaches_97_percent_held_out(tmp_path):
    judge, accuracy = gan_eval.load_or_train_judge(tmp_path / "judge", log=lambda *_: None)
    assert accuracy >= 0.97
    # cached: a second call loads the same weights instead of training
    again, cached_accuracy = gan_eval.load_or_train_judge(tmp_path / "judge")
    assert cached_accuracy == accuracy
    x = load_digits_split("test", 28).images[:8]
    np.testing.assert_allclose(again(x).detach().numpy(), judge.eval()(x).detach().numpy(), rtol=1e-5, atol=1e-6)
