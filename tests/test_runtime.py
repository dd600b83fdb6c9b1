"""The training loops' shared runtime: the stop request (Ctrl-C or SIGTERM once asks, twice interrupts) and the
loss types."""

import re
import signal

import pytest
import torch

from egaku.errors import EgakuError
from egaku.training.runtime import StopOnSignal


@pytest.mark.parametrize("first", [signal.SIGINT, signal.SIGTERM])
def test_first_signal_asks_to_stop_the_second_interrupts_and_handlers_come_back(first):
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    with StopOnSignal() as stop:
        assert not stop.requested
        signal.raise_signal(first)
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert {sig: signal.getsignal(sig) for sig in before} == before


@pytest.mark.parametrize("quiet", [False, True])
def test_only_the_main_process_says_it_will_stop(quiet, capsys):
    """Under torchrun the signal reaches every process; the others (quiet) stop as asked without a line each."""
    with StopOnSignal(quiet=quiet) as stop:
        signal.raise_signal(signal.SIGTERM)
        assert stop.requested
    said = capsys.readouterr().err
    assert ("SIGTERM: stopping after this step with a checkpoint" in said) is not quiet


# ---- loss types (kohya's --loss_type, --huber_c, --huber_schedule) ---------------------------------------

def test_pseudo_huber_is_l2_for_small_errors_linear_for_large_and_smooth_l1_is_it_over_c():
    from egaku.training.runtime import elementwise_loss

    pred = torch.tensor([[1e-3, -2e-3, 10.0, -100.0]])
    target = torch.zeros_like(pred)
    c = torch.tensor([0.1])
    huber = elementwise_loss(pred, target, "huber", c)[0]
    torch.testing.assert_close(huber[:2], pred[0, :2] ** 2, rtol=1e-3, atol=0)  # |d| << c: d^2
    torch.testing.assert_close(huber[2:], 2 * 0.1 * pred[0, 2:].abs() - 2 * 0.1 ** 2, rtol=1e-3, atol=0)  # 2c|d| - 2c^2
    # kohya's formula, 2c(sqrt(d^2 + c^2) - c), in float64
    d = pred.double()
    torch.testing.assert_close(huber.double(), (2 * 0.1 * ((d ** 2 + 0.01).sqrt() - 0.1))[0], rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(elementwise_loss(pred, target, "smooth_l1", c), huber[None] / 0.1)
    torch.testing.assert_close(elementwise_loss(pred, target, "l2"), pred ** 2)
    torch.testing.assert_close(elementwise_loss(pred, target, "l1"), pred.abs())
    # a threshold far above every error is L2 to float precision (no cancellation in the stable form)
    torch.testing.assert_close(elementwise_loss(pred[:, :3], target[:, :3], "huber", torch.tensor([1e5])),
                               pred[:, :3] ** 2, rtol=1e-6, atol=0)


def test_huber_thresholds_run_from_one_at_clean_timesteps_to_c_at_noisy_ones_per_sample():
    from diffusers import DDPMScheduler

    from egaku.training.runtime import elementwise_loss, huber_thresholds

    for zero_snr in (False, True):
        scheduler = DDPMScheduler(num_train_timesteps=1000, rescale_betas_zero_snr=zero_snr)
        t = torch.tensor([0, 500, 999])
        for schedule in ("snr", "exponential"):
            c = huber_thresholds(scheduler, t, 0.1, schedule)
            assert torch.isfinite(c).all() and c[0] > 0.9 and c[0] > c[1] > c[2] >= 0.1 - 1e-6
            assert c[2] < 0.11
        torch.testing.assert_close(huber_thresholds(scheduler, t, 0.3, "constant"), torch.full((3,), 0.3))
    # each sample of a batch takes its own threshold
    pred = torch.ones(3, 4, 2, 2)
    c = huber_thresholds(scheduler, t, 0.1, "snr")
    per_sample = elementwise_loss(pred, torch.zeros_like(pred), "huber", c).mean(dim=(1, 2, 3))
    expected = 2 * c * ((1 + c ** 2).sqrt() - c)
    torch.testing.assert_close(per_sample, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("loss_type,c,schedule,message", [
    ("huber", 2.0, "snr", "in (0, 1]"), ("smooth_l1", 0.0, "exponential", "in (0, 1]"),
    ("huber", -1.0, "constant", "above 0"), ("l3", 0.1, "snr", "unknown --loss-type"),
    ("huber", 0.1, "cosine", "unknown --huber-schedule")])
def test_bad_loss_options_are_refused_with_what_to_give(loss_type, c, schedule, message):
    from egaku.training.runtime import check_loss_type

    with pytest.raises(EgakuError, match=re.escape(message)):
        check_loss_type(loss_type, c, schedule)
    check_loss_type("l2", 2.0, "snr")  # the threshold is not read by l2
    check_loss_type("huber", 5.0, "constant")


def _checkpoint(root, step):
    from egaku.training.runtime import Checkpoints

    return Checkpoints(root, keep=3).save(step, {"model": {"w": torch.full((2,), float(step))}}, {"step": step},
                                          {"lr": 1.0})


def test_a_fresh_run_is_refused_where_another_left_checkpoints_and_keep_must_be_positive(tmp_path):
    from egaku.training.runtime import Checkpoints

    Checkpoints(tmp_path / "new").check_fresh_start()  # nothing there: fine
    _checkpoint(tmp_path / "old", 300)
    with pytest.raises(EgakuError, match="already holds a run's checkpoints .*step-000300.*--resume latest"):
        Checkpoints(tmp_path / "old").check_fresh_start()
    for keep in (0, -1):
        with pytest.raises(EgakuError, match="--keep-checkpoints must be at least 1"):
            Checkpoints(tmp_path / "x", keep=keep)


def test_a_damaged_or_missing_checkpoint_file_names_it_and_the_older_checkpoint(tmp_path):
    from egaku.training.runtime import load_checkpoint

    older, newer = _checkpoint(tmp_path, 1), _checkpoint(tmp_path, 2)
    weights, state = load_checkpoint(newer, {"lr": 1.0})
    assert state["step"] == 2 and float(weights["model"]["w"][0]) == 2.0
    with pytest.raises(EgakuError, match=f"ema.safetensors is missing; move {re.escape(str(newer))} aside and resume "
                                         f"from an older checkpoint \\(--resume {re.escape(str(older))}\\)"):
        weights["ema"]
    (newer / "model.safetensors").write_bytes(b"\x01\x02")  # truncated
    with pytest.raises(EgakuError, match="model.safetensors cannot be read .*--resume .*step-000001"):
        load_checkpoint(newer, {"lr": 1.0})
    (newer / "model.safetensors").unlink()
    (newer / "state.pt").write_bytes(b"")
    with pytest.raises(EgakuError, match="state.pt cannot be read"):
        load_checkpoint(newer, {"lr": 1.0})
    only = _checkpoint(tmp_path / "alone", 5)
    (only / "state.pt").write_bytes(b"PK")
    with pytest.raises(EgakuError, match="start the run again in another --out folder"):
        load_checkpoint(only, {"lr": 1.0})


def test_the_metrics_log_drops_the_rows_past_the_step_a_run_resumes_from(tmp_path):
    from egaku.training.runtime import MetricsLog

    log = MetricsLog(tmp_path / "m.csv", start_step=0)
    for step in range(1, 6):
        log.log(step, loss=step)
    # a crash after step 5, the last checkpoint at step 3: steps 4 and 5 are trained and logged again
    log = MetricsLog(tmp_path / "m.csv", start_step=3)
    for step in (4, 5):
        log.log(step, loss=step)
    steps = [line.split(",")[0] for line in (tmp_path / "m.csv").read_text().splitlines()[1:]]
    assert steps == ["1", "2", "3", "4", "5"]
    MetricsLog(tmp_path / "m.csv")  # a run that only exports keeps every row
    assert len((tmp_path / "m.csv").read_text().splitlines()) == 6


def test_the_metrics_log_writes_tensorboard_events_that_a_resume_replaces_as_the_csv_rows(tmp_path,
                                                                                         tensorboard_events):
    from PIL import Image

    from egaku.training.runtime import MetricsLog

    log = MetricsLog(tmp_path / "m.csv", start_step=0, tensorboard=True)
    for step in range(1, 6):
        log.log(step, loss=step, lr=0.1)
    log.image(5, "validation", Image.new("RGB", (8, 4), "red"))
    log.close()
    # the run resumes from its checkpoint at step 3: steps 4 and 5 are trained and logged again, with new values
    log = MetricsLog(tmp_path / "m.csv", start_step=3, tensorboard=True)
    for step in (4, 5):
        log.log(step, loss=10 * step, lr=0.1)
    log.close()
    scalars, images = tensorboard_events(tmp_path / "logs")
    assert scalars["loss"] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0)]
    assert [step for step, _ in scalars["lr"]] == [1, 2, 3, 4, 5]
    assert images == {"validation": []}  # the image of step 5 was logged before the resume: hidden with it
    rows = [line.split(",") for line in (tmp_path / "m.csv").read_text().splitlines()[1:]]
    assert [(int(r[0]), float(r[2])) for r in rows] == scalars["loss"]


def test_tensorboard_logging_without_the_package_is_refused_before_training(monkeypatch):
    import importlib.util

    from egaku.config import build
    from egaku.training.gan import TrainGanOptions
    from egaku.training.ldm import TrainLdmOptions
    from egaku.training.lora import TrainLoraOptions

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    for options in (TrainLoraOptions, TrainLdmOptions, TrainGanOptions):
        with pytest.raises(EgakuError, match=r"--log-with tensorboard needs the tensorboard package: pip install"):
            build(options, {"log_with": "tensorboard"})
        assert build(options, {}).log_with == "csv"


def test_progress_in_a_log_is_plain_lines_with_rate_and_time_left(monkeypatch):
    import io

    from egaku.training import runtime
    from egaku.progress import LogProgress, progress_bar

    clock = [100.0]
    monkeypatch.setattr(runtime.time, "monotonic", lambda: clock[0])
    log = io.StringIO()
    bar = LogProgress(total=100, initial=20, desc="train-lora", interval=30.0, file=log)
    for _ in range(10):  # 10 steps in 20 s: under the interval, nothing written
        clock[0] += 2.0
        bar.update(1)
    assert log.getvalue() == ""
    bar.set_postfix(loss="0.0412")
    for _ in range(10):  # the interval passes at the 15th step (30 s)
        clock[0] += 2.0
        bar.update(1)
    bar.close()
    bar.close()  # a second close writes nothing more
    at_the_end = LogProgress(total=2, interval=1.0, file=log)
    clock[0] += 5.0
    at_the_end.update(2)  # written by the update: close does not repeat it
    at_the_end.close()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert lines == ["train-lora: 35/100 steps (35%), loss=0.0412, 0.5 steps/s, 2:10 left",
                     "train-lora: 40/100 steps (40%), loss=0.0412, 0.5 steps/s, 2:00 left",
                     "2/2 steps (100%), 0.4 steps/s"]
    # a redirected stderr gets log lines, a terminal tqdm
    monkeypatch.setattr(runtime.sys, "stderr", io.StringIO())
    assert isinstance(progress_bar(10, desc="x"), LogProgress)
    assert not isinstance(progress_bar(10, desc="x", disable=True), LogProgress)
    tty = io.StringIO()
    tty.isatty = lambda: True
    monkeypatch.setattr(runtime.sys, "stderr", tty)
    assert not isinstance(progress_bar(10, desc="x"), LogProgress)


def test_a_resume_from_an_earlier_step_than_the_folder_holds_is_refused_before_it_mixes_two_runs(tmp_path):
    from egaku.training.runtime import Checkpoints

    for step in (2, 5, 6):
        _checkpoint(tmp_path / "run", step)
    checkpoints = Checkpoints(tmp_path / "run")
    assert checkpoints.resolve("latest").name == "step-000006"
    assert checkpoints.resolve(str(tmp_path / "run")).name == "step-000006"  # the run folder: its latest
    # step 3 would be written and then pruned as the oldest, and 'latest' would name it
    with pytest.raises(EgakuError, match="already holds step-000005, step-000006, as late as or later than it"):
        checkpoints.resolve(str(tmp_path / "run" / "checkpoints" / "step-000002"))
    elsewhere = _checkpoint(tmp_path / "other", 2)  # another folder's checkpoint: the same
    with pytest.raises(EgakuError, match="resume into a new --out, or delete those step folders first"):
        checkpoints.resolve(str(elsewhere))
    assert Checkpoints(tmp_path / "new").resolve(str(elsewhere)) == elsewhere  # into an empty --out: fine
    assert Checkpoints(tmp_path / "other").resolve(str(elsewhere)) == elsewhere  # the folder's own latest


def test_a_checkpoint_renamed_aside_beside_the_others_is_neither_resumed_nor_pruned(tmp_path):
    from egaku.training.runtime import Checkpoints

    for step in (1, 2):
        _checkpoint(tmp_path, step)
    root = tmp_path / "checkpoints"
    # what a damaged checkpoint's error says to do, done in place
    (root / "step-000002").rename(root / "step-000002.bad")
    checkpoints = Checkpoints(tmp_path, keep=2)
    assert checkpoints.latest().name == "step-000001"  # the pointer names the moved folder: not followed
    assert checkpoints.resolve("latest").name == "step-000001"
    for step in (2, 3):
        checkpoints.save(step, {"model": {"w": torch.zeros(2)}}, {"step": step}, {"lr": 1.0})
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000002", "step-000002.bad", "step-000003"]
    (root / "latest").write_text("../../elsewhere/step-000009\n")  # a pointer out of the folder is not followed
    assert checkpoints.latest().name == "step-000003"


def test_resume_latest_says_which_incomplete_checkpoint_it_passes_over(tmp_path, capsys):
    from egaku.training.runtime import Checkpoints

    for step in (1, 2):
        _checkpoint(tmp_path, step)
    (tmp_path / "checkpoints" / "step-000002" / "state.pt").unlink()
    assert Checkpoints(tmp_path).resolve("latest").name == "step-000001"
    assert "no state.pt in step-000002" in capsys.readouterr().err


def test_a_damaged_config_of_a_checkpoint_names_the_older_one_not_another_trainer(tmp_path):
    from egaku.training.runtime import trainer_config

    older, newer = _checkpoint(tmp_path, 1), _checkpoint(tmp_path, 2)
    (newer / "config.json").write_text('{\n  "lr": ')  # cut short
    with pytest.raises(EgakuError, match=f"config.json cannot be read .*--resume {re.escape(str(older))}"):
        trainer_config(newer, "train-lora")
    (newer / "config.json").unlink()
    with pytest.raises(EgakuError, match="config.json cannot be read \\(it is missing\\)"):
        trainer_config(newer, "train-lora")
    with pytest.raises(EgakuError, match="is not a train-lora checkpoint"):  # a folder that is none at all
        trainer_config(tmp_path, "train-lora")


@pytest.mark.parametrize("failure", [RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 92800"),
                                     OSError(28, "No space left on device")])
def test_a_checkpoint_that_cannot_be_written_is_one_line_and_keeps_the_last_one(tmp_path, monkeypatch, failure):
    from egaku.training import runtime

    last = _checkpoint(tmp_path, 1)

    def full_disk(*args, **kwargs):
        raise failure

    monkeypatch.setattr(runtime.torch, "save", full_disk)  # how a full disk fails torch.save
    with pytest.raises(EgakuError, match=f"writing checkpoint .*step-000002 failed \\({type(failure).__name__}.* MiB "
                                         f"free there\\); training stopped, the last checkpoint, {re.escape(str(last))}"
                                         ", is intact: .*--resume latest"):
        runtime.Checkpoints(tmp_path).save(2, {"model": {"w": torch.zeros(2)}}, {"step": 2}, {"lr": 1.0})
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-000001"]


def test_the_unfinished_writes_of_a_killed_run_are_removed_before_the_next_checkpoint(tmp_path):
    from egaku.training.runtime import Checkpoints

    _checkpoint(tmp_path, 1)
    killed = tmp_path / "checkpoints" / ".tmp-step-000002-abcd1234"  # a SIGKILL during the write of step 2
    killed.mkdir()
    (killed / "model.safetensors").write_bytes(b"\0" * 100)
    Checkpoints(tmp_path).save(2, {"model": {"w": torch.zeros(2)}}, {"step": 2}, {"lr": 1.0})
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-000001", "step-000002"]


def test_a_lost_process_of_a_distributed_run_is_one_line_naming_the_checkpoint_to_resume(tmp_path):
    from egaku.training.runtime import Checkpoints, another_process_lost

    last = _checkpoint(tmp_path, 4)
    gloo = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                        "[127.0.0.1]:48860. This is typically caused by a remote worker crashing.")
    with pytest.raises(EgakuError, match=f"another process of this 2-process run ended .*Connection closed by peer.*"
                                         f"the last checkpoint is {re.escape(str(last))}: .*continue on 2 processes "
                                         "with --resume latest"):
        with another_process_lost(2, Checkpoints(tmp_path)):
            raise gloo
    with pytest.raises(EgakuError, match="no checkpoint was written yet: train again"):
        with another_process_lost(2, Checkpoints(tmp_path / "new")):
            raise gloo
    for world, error in ((1, gloo), (2, RuntimeError("mat1 and mat2 shapes cannot be multiplied"))):
        with pytest.raises(RuntimeError) as raised:  # one process, or another failure: as it was
            with another_process_lost(world, Checkpoints(tmp_path)):
                raise error
        assert raised.value is error
