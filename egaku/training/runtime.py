"""What every training loop shares: atomic checkpoints, exact resume, RNG state, stop on Ctrl-C, NaN guard, logs,
and the processes of a distributed run (accelerate).

Checkpoint layout (one folder per step, written atomically)::

    OUT/checkpoints/step-000100/
        <name>.safetensors   one per model (weights, fp32)
        state.pt             optimizer, LR scheduler, RNG, step, data position (loaded weights_only=True)
        config.json          the resolved options of the run
    OUT/checkpoints/latest   text file naming the newest complete step folder

A step folder is written under a temporary name and renamed into place, and ``latest`` is replaced
atomically after that, so a crash or a full disk mid-write leaves the previous checkpoint valid.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..config import config_difference
from ..errors import EgakuError, first_line


def capture_rng() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": _numpy_state_to_plain(np.random.get_state()),
        "python": _python_state_to_plain(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(_plain_to_numpy_state(state["numpy"]))
    random.setstate(_plain_to_python_state(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# numpy and python RNG states hold arrays/tuples; weights_only loading accepts tensors, lists and ints.
def _numpy_state_to_plain(st):
    return [st[0], torch.from_numpy(np.asarray(st[1], dtype=np.int64)), int(st[2]), int(st[3]), float(st[4])]


def _plain_to_numpy_state(st):
    return (st[0], st[1].numpy().astype(np.uint32), st[2], st[3], st[4])


def _python_state_to_plain(st):
    return [st[0], list(st[1]), st[2]]


def _plain_to_python_state(st):
    return (st[0], tuple(st[1]), st[2])


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


_UMASK: int | None = None


def permissions_by_umask(path: Path) -> None:
    """Give ``path`` (a folder: with everything in it) the mode a plain open() or mkdir() would have given it.
    tempfile makes files 0600 and folders 0700, and safetensors writes 0600, so the outputs written through
    them would be unreadable to the other users and services that a plain file of the run can be read by."""
    global _UMASK
    if _UMASK is None:  # read once: os.umask can only be read by setting it, which is not thread-safe
        _UMASK = os.umask(0o022)
        os.umask(_UMASK)
    path = Path(path)
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~_UMASK)


def _replace_atomically(path: Path, write: Callable[[str], None]) -> None:
    """``write(tmp)`` fills a uniquely named temporary file beside ``path`` (several processes may write
    the same path); it is fsynced and renamed over ``path``, so no reader ever sees half of it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        permissions_by_umask(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save_file(tensors: dict[str, torch.Tensor], path: str | Path,
                     metadata: dict[str, str] | None = None) -> Path:
    """Write a safetensors file atomically (creating its folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _replace_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return path


def atomic_write_text(path: Path, text: str) -> None:
    _replace_atomically(Path(path), lambda tmp: Path(tmp).write_text(text))


class Checkpoints:
    """Save and find training checkpoints under ``out_dir/checkpoints``, keeping the newest ``keep``."""

    def __init__(self, out_dir: str | Path, keep: int = 2):
        if keep < 1:  # 0 would delete each checkpoint as it is written, the one a resume needs too
            raise EgakuError(f"--keep-checkpoints must be at least 1 (the newest is what --resume continues from), "
                             f"got {keep}")
        self.root = Path(out_dir) / "checkpoints"  # (each trainer checks its --out with check_output first)
        self.keep = keep
        self._swept = False  # whether the unfinished writes of killed runs were removed (before the first save)

    def check_fresh_start(self) -> None:
        """A run that does not resume may not start where another run left checkpoints: it would prune its own
        new checkpoints (the older run's have higher steps) and mix its logs with that run's."""
        last = self.latest()
        if last is not None:
            raise EgakuError(f"{self.root.parent} already holds a run's checkpoints (the latest: {last.name}); "
                             f"continue it with --resume latest, or start this run in another --out folder "
                             f"(or delete {self.root})")

    def save(self, step: int, weights: dict[str, dict[str, torch.Tensor]], state: dict[str, Any],
             config: dict[str, Any]) -> Path:
        final = self.root / f"step-{step:06d}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            if not self._swept:
                self._sweep_unfinished()
            tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=f".tmp-step-{step:06d}-"))
        except OSError as exc:
            raise self._write_failed(final, exc) from None
        try:
            for name, sd in weights.items():
                save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()}, tmp / f"{name}.safetensors")
            torch.save(state, tmp / "state.pt")
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            for f in tmp.iterdir():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            permissions_by_umask(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            atomic_write_text(self.root / "latest", final.name + "\n")
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            # a full disk makes torch.save fail with "unexpected pos" (a RuntimeError), safetensors with an OSError
            if isinstance(exc, (OSError, RuntimeError)):
                raise self._write_failed(final, exc) from None
            raise
        self._prune()
        return final

    def _write_failed(self, final: Path, exc: BaseException) -> EgakuError:
        """A checkpoint that could not be written (a full disk, a read-only or vanished folder): one line saying
        which, with the free space, the checkpoint a resume continues from, and what to do."""
        reason = first_line(exc, 200)
        try:
            free = f"; {shutil.disk_usage(self.root if self.root.is_dir() else self.root.parent).free / 2**20:.0f} " \
                   f"MiB free there"
        except OSError:
            free = ""
        last = self.latest()
        resume = (f"the last checkpoint, {last}, is intact: free some space (or fix the folder) and continue with "
                  "--resume latest" if last else "no checkpoint was written yet: free some space (or fix the folder) "
                  f"and {train_again(self)}")
        return EgakuError(f"writing checkpoint {final} failed ({type(exc).__name__}: {reason}{free}); training "
                          f"stopped, {resume}")

    def _sweep_unfinished(self) -> None:
        """Remove the temporary folders of checkpoint writes that a killed run (SIGKILL, a power cut) left: each holds
        up to a whole checkpoint, which no resume reads. Once per run, before its first checkpoint: a write under way
        is this run's own."""
        for unfinished in self.root.glob(".tmp-step-*"):
            shutil.rmtree(unfinished, ignore_errors=True)
        self._swept = True

    def _prune(self) -> None:
        steps = step_folders(self.root)
        for old in steps[: max(0, len(steps) - self.keep)]:
            shutil.rmtree(old, ignore_errors=True)

    def latest(self) -> Path | None:
        pointer = self.root / "latest"
        if pointer.is_file():
            # only a step folder of this run: a pointer edited (or damaged) to name anything else is not followed
            name = pointer.read_text(errors="replace").strip()
            path = self.root / name
            if "/" not in name and checkpoint_step(path) is not None and (path / "state.pt").is_file():
                return path
        complete = [p for p in step_folders(self.root) if (p / "state.pt").is_file()]
        return complete[-1] if complete else None

    def resolve(self, resume: str) -> Path:
        """``latest`` or a path to a step folder (or to a run folder holding checkpoints/)."""
        if resume == "latest":
            path = self.latest()
            if path is None:
                raise EgakuError(f"--resume latest: no checkpoint found under {self.root}; start without --resume")
            skipped = [p.name for p in step_folders(self.root)
                       if checkpoint_step(p) > checkpoint_step(path) and not (p / "state.pt").is_file()]
            if skipped and int(os.environ.get("RANK", "0")) == 0:  # said once, by the first of several processes
                print(f"--resume latest: no state.pt in {', '.join(skipped)} under {self.root} (a write cut short, or "
                      f"files removed): resuming from {path.name}, the latest complete checkpoint", file=sys.stderr)
            return path
        path = Path(resume)
        if (path / "checkpoints").is_dir():
            found = Checkpoints(path).latest()
            if found is None:
                raise EgakuError(f"--resume {resume}: no complete checkpoint under {path / 'checkpoints'}")
            self._check_nothing_newer_than(found)
            return found
        if not (path / "state.pt").is_file():
            raise EgakuError(f"--resume {resume}: not a checkpoint folder (expected {path / 'state.pt'})")
        self._check_nothing_newer_than(path)
        return path

    def _check_nothing_newer_than(self, resume_from: Path) -> None:
        """Resuming from an older step (or another folder's checkpoint) into a folder holding later steps would
        mix two runs: the new checkpoints would be pruned as the oldest, and ``latest`` would name a deleted one."""
        step = checkpoint_step(resume_from)
        if step is None:
            return
        newer = [p.name for p in step_folders(self.root)
                 if checkpoint_step(p) >= step and p.resolve() != resume_from.resolve()]
        if newer:
            raise EgakuError(f"--resume {resume_from}: {self.root} already holds {', '.join(newer)}, as late as or "
                             "later than it, and the resumed run's checkpoints would be mixed with them; resume "
                             f"into a new --out, or delete those step folders first")


def checkpoint_step(folder: Path) -> int | None:
    """The step of a checkpoint folder, ``step-000123``; None for a folder of another name."""
    digits = folder.name.removeprefix("step-")
    return int(digits) if folder.name.startswith("step-") and digits.isdigit() else None


def step_folders(root: Path) -> list[Path]:
    """The checkpoint folders under ``root`` (``step-000123``), oldest first. A folder moved aside under another name
    beside them (``step-000123.bad``, as an error about a damaged checkpoint suggests) is none of them: it is
    neither resumed from nor pruned."""
    found = [p for p in root.glob("step-*") if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


# options that only one trainer has: a checkpoint's config.json (the options of the run that wrote it) tells which
TRAINER_OPTIONS = {"train-ldm": {"vae_steps", "unet_channels", "cross_attention_dim"},
                   "train-gan": {"arch", "latent_dim", "base_channels"},
                   "train-lora": {"rank", "target_modules"}}


def config_writer(saved: Any) -> str | None:
    """The trainer (train-ldm, train-gan, train-lora) whose options a saved config holds, if any."""
    return next((name for name, keys in TRAINER_OPTIONS.items() if isinstance(saved, dict) and keys <= set(saved)),
                None)


def trainer_config(path: Path, trainer: str) -> dict[str, Any]:
    """The config of checkpoint ``path``, which ``trainer`` must have written: another trainer's checkpoint (whose
    config, compared with this run's, would differ in every field) is an error that names the one to resume it
    with, and so is a config.json that cannot be read."""
    try:
        saved = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        if checkpoint_step(path) is not None and (path / "state.pt").is_file():  # a damaged checkpoint: say which
            # one to resume from instead (any other folder may be anything: said to be no checkpoint below)
            reason = "it is missing" if not (path / "config.json").exists() else f"{type(exc).__name__}: {exc}"
            raise EgakuError(f"cannot resume from {path}: config.json cannot be read ({reason}); "
                             f"{older_checkpoint_advice(path)}") from None
        saved, why = None, f" (its config.json cannot be read: {exc})"
    else:
        writer = config_writer(saved)
        if writer == trainer:
            return saved
        why = f" (it was written by {writer}: resume it with `egaku {writer} --resume`)" if writer else ""
    raise EgakuError(f"{path} is not a {trainer} checkpoint{why}; pass --resume latest or a step folder written "
                     f"by {trainer}")


def saved_config(path: Path, defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """A checkpoint's config, with ``defaults`` for the options it predates (see ``load_checkpoint``)."""
    return {**(defaults or {}), **json.loads((path / "config.json").read_text())}


def load_checkpoint(path: Path, current_config: dict[str, Any], ignore: set[str] = frozenset(),
                    defaults: dict[str, Any] | None = None
                    ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """Load weights and state; refuse when the saved config differs from the current one.

    ``defaults`` fill options the checkpoint's config lacks (added after it was written: their defaults keep
    the behaviour of before), so that adding an option does not make every older checkpoint unresumable.
    """
    saved = saved_config(path, defaults)
    diffs = config_difference(saved, current_config, ignore=ignore)
    if diffs:
        raise EgakuError(f"cannot resume from {path}: the configuration changed ({'; '.join(diffs)}). "
                         "Resume with the same options, or start a new run in another --out folder")
    fallback = older_checkpoint_advice(path)
    weights = CheckpointWeights(path, fallback)
    current = path / "state.pt"
    try:
        for file in sorted(path.glob("*.safetensors")):
            current = file
            weights[file.stem] = load_file(file)
        current = path / "state.pt"
        # Our own file, but a user may point --resume anywhere: never allow arbitrary unpickling.
        state = torch.load(current, weights_only=True, map_location="cpu")  # a GPU run resumes anywhere
    except Exception as exc:  # noqa: BLE001 - any reader failure means a damaged file
        reason = ("it is missing" if not current.exists() else
                  f"{type(exc).__name__}: {first_line(exc, 200)}".rstrip(": "))
        raise EgakuError(f"cannot resume from {path}: {current.name} cannot be read ({reason}); {fallback}") from None
    return weights, state


def older_checkpoint_advice(path: Path) -> str:
    """What to do when checkpoint ``path`` is damaged: resume from the one before it, this one moved aside first (a
    resume refuses to write beside checkpoints later than its own), or start again."""
    step = checkpoint_step(path)
    older = [p for p in step_folders(path.parent) if p.name != path.name and (p / "state.pt").is_file()
             and (step is None or checkpoint_step(p) < step)]
    if older:  # (renamed beside it, step-000123.bad, it is no checkpoint either: step_folders)
        return f"move {path} aside and resume from an older checkpoint (--resume {older[-1]})"
    return "start the run again in another --out folder"


class CheckpointWeights(dict):
    """A checkpoint's weights by file name; a file that is not there is an error that says what to do."""

    def __init__(self, path: Path, fallback: str):
        super().__init__()
        self.path, self.fallback = path, fallback

    def __missing__(self, name: str):
        raise EgakuError(f"cannot resume from {self.path}: {name}.safetensors is missing; {self.fallback}")


def data_fingerprint(*parts: Any) -> str:
    """A sha256 of the training data as a trainer holds it (pixel arrays after resizing, captions, labels), in
    order: a resume compares it with the checkpoint's to find out whether the data changed."""
    import hashlib

    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            part = part.detach().cpu().numpy()
        if isinstance(part, np.ndarray):
            digest.update(f"{part.dtype}{part.shape}".encode())
            digest.update(np.ascontiguousarray(part).tobytes())
        else:
            digest.update(json.dumps(part, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def check_same_fingerprint(state: dict[str, Any], fingerprint: str, images: int, checkpoint: Path) -> None:
    """Refuse to resume on other training data than the checkpoint's (``data_fingerprint``): the data position
    it restores and the weights an uninterrupted run would end with belong to that data. A checkpoint written
    before fingerprints were recorded is taken as it is."""
    saved = state.get("data_fingerprint")
    if saved is None or saved == fingerprint:
        return
    then = state.get("data_images")
    count = f"{then} images then, {images} now" if then is not None and int(then) != images else f"{images} images"
    raise EgakuError(f"cannot resume from {checkpoint}: the training data changed since it was written ({count}; "
                     "images, their order, captions or labels differ). Put the data back as it was, or start a new "
                     "run in another --out folder")


def make_accelerator(device: str, mixed_precision: str = "no"):
    """The run's ``accelerate.Accelerator``: one process, or one of those ``accelerate launch`` / ``torchrun``
    started (then accelerate picks each process's device). ``device`` is the trainer's --device option."""
    from accelerate import Accelerator

    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # a second run in the same process (Python API, tests) may use another precision
        from accelerate.state import AcceleratorState
        AcceleratorState._reset_state(reset_partial_state=True)
    # accelerate only sets up multi-process CPU training (gloo) when told cpu=True
    on_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available()
                                 and not torch.backends.mps.is_available())
    return Accelerator(mixed_precision=mixed_precision, cpu=on_cpu)


def agree_on_step(accelerator, stop_requested: bool, *values: float) -> tuple[list[float], bool]:
    """The step's ``values`` (losses) averaged over the processes, and whether any process was asked to stop: one
    gather per step, so that every process logs the same losses and stops (or fails on NaN) at the same step."""
    stats = accelerator.gather(torch.tensor([[*values, float(stop_requested)]], device=accelerator.device))
    return stats[:, :-1].mean(0).tolist(), bool(stats[:, -1].any())


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """The seed of one training step of one process: a resumed run draws the same numbers as an uninterrupted one,
    and each process of a distributed run (``rank``) draws its own."""
    # torch seeds its CPU generator with the low 32 bits only: the rank's offset must change those
    return seed * 1_000_003 + step + rank * 0x9E3779B9


def check_same_world(state: dict[str, Any], world: int, checkpoint: Path, why: str) -> None:
    """A checkpoint resumes only on as many processes as wrote it (``why``: what depends on the count); checkpoints
    that predate the count were written by one process."""
    saved = int(state.get("world", 1))
    if saved != world:
        raise EgakuError(f"cannot resume from {checkpoint}: it was written by a run on {saved} process(es), this one "
                         f"has {world}; {why}. Resume with {saved} process(es)")


@contextlib.contextmanager
def another_process_lost(world: int, checkpoints: Checkpoints):
    """Around a distributed training loop: when another process of the run dies (killed, out of memory, its machine
    gone), the next collective of each survivor fails with a gloo or NCCL RuntimeError and a traceback that does not
    say what happened or what to do. It becomes one line naming the last checkpoint and the resume."""
    try:
        yield
    except RuntimeError as exc:
        text = str(exc)
        if world == 1 or not any(mark in text.lower() for mark in ("gloo", "nccl", "closed by peer", "reset by peer")):
            raise
        last = checkpoints.latest()
        where = (f"the last checkpoint is {last}: once the cause is fixed, continue on {world} processes with --resume "
                 "latest" if last else f"no checkpoint was written yet: {train_again(checkpoints)}")
        reason = first_line(exc, 300)
        raise EgakuError(f"another process of this {world}-process run ended or lost its connection ({reason}); "
                         f"the launcher's output names the process that failed first and why. Training stopped, "
                         f"{where}") from None


def check_replicas_agree(accelerator, params, what: str) -> None:
    """Every process must hold the same weights at the end, or a saved file is one process's private version."""
    checksum = torch.stack([p.detach().double().sum() for p in params]).sum()[None]
    sums = accelerator.gather(checksum)
    if not torch.allclose(sums, sums[0].expand_as(sums), rtol=1e-6, atol=1e-9):
        raise RuntimeError(f"{what} differ between processes after training: {sums.tolist()}")


def either(choices: list[str]) -> str:
    """``a, b or c``."""
    return ", ".join(choices[:-1]) + " or " + choices[-1] if len(choices) > 1 else "".join(choices)


def check_finite(loss: torch.Tensor | float, step: int, checkpoints: Checkpoints,
                 advice: Callable[[Path | None], str] | None = None) -> None:
    """Stop on NaN/inf loss, pointing at the last checkpoint. ``advice(last checkpoint or None)`` says what to do
    (a trainer whose resume may change the fixes says so); by default a lower learning rate in a new run, since a
    resume repeats the run's options (and would reach the same loss again)."""
    if not math.isfinite(float(loss)):
        last = checkpoints.latest()
        where = f"the last checkpoint is {last}" if last else "no checkpoint was written yet"
        text = advice(last) if advice else (f"Try: lower the learning rate, and {train_again(checkpoints)}: a resume "
                                            "repeats the run's options")
        raise EgakuError(f"loss became {float(loss)} at step {step}; training stopped, {where}. {text}")


def train_again(checkpoints: Checkpoints) -> str:
    """How to start a run again where ``checkpoints`` are: a fresh start refuses a folder that holds some."""
    if checkpoints.latest() is None:
        return "train again (into the same --out)"
    return f"train again into a new --out (or into this one after deleting {checkpoints.root})"


class StopOnSignal:
    """Turns the first Ctrl-C (SIGINT) or SIGTERM in a training loop into a request: the loop finishes the step it
    is on, writes a checkpoint and stops, so that ``--resume latest`` continues without losing a step. A second
    signal stops at once (KeyboardInterrupt), as Ctrl-C always does.

    SIGTERM is what batch schedulers and torchrun send before they kill a job. Handlers go in only on the main
    thread (where Python delivers signals), and the previous ones come back when the loop ends.
    """

    def __init__(self, quiet: bool = False) -> None:
        self.requested = False
        self.quiet = quiet  # the other processes of a run: the signal reaches them all, and one line is enough
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._request)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _request(self, signum: int, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if not self.quiet:
            print(f"\n{signal.Signals(signum).name}: stopping after this step with a checkpoint "
                  "(send it again to stop at once, losing the steps since the last checkpoint)", file=sys.stderr)


def stop_after_signal(step: int, checkpoint: Path | None, quiet: bool = False) -> None:
    """End a loop stopped by ``StopOnSignal`` after writing ``checkpoint``: say how to continue (unless ``quiet``:
    another process says it), then raise KeyboardInterrupt (the CLI exits with 130, like any interrupted command)."""
    if not quiet:
        print(f"interrupted at step {step}; checkpoint {checkpoint} written, continue with --resume latest",
              file=sys.stderr)
    raise KeyboardInterrupt


LOG_WITH = ("csv", "tensorboard")
TENSORBOARD_DIR = "logs"  # under the run's output folder, where diffusers' training scripts write theirs


def check_log_with(log_with: str) -> None:
    """--log-with tensorboard needs the tensorboard package, which egaku does not install by default: say so before
    any training, not after the first step."""
    if log_with not in LOG_WITH:
        raise EgakuError(f"--log-with must be one of {', '.join(LOG_WITH)}, got {log_with!r}")
    if log_with == "tensorboard":
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None:
            raise EgakuError("--log-with tensorboard needs the tensorboard package: pip install tensorboard (or "
                             "pip install 'egaku[tensorboard]'), or leave --log-with out for the CSV log alone",
                             param="log_with")


class MetricsLog:
    """Append-only CSV of scalars per step (opens in any spreadsheet or pandas), and with ``tensorboard`` the same
    scalars as TensorBoard event files in ``logs/`` beside it (``tensorboard --logdir OUT/logs``), each value under
    its own name.

    ``start_step``: the step a training run starts from (a resumed checkpoint's, or 0). Rows of later steps,
    which a run stopped after its last checkpoint had logged, are dropped: those steps are trained and logged
    again. TensorBoard hides its events of those steps the same way (``purge_step``). None (a run that only
    exports) keeps every row.

    ``resumed_from``: the checkpoint a run resumes from. When it belongs to a run in another folder (``--resume PATH``
    with a new ``--out``), that run's rows up to ``start_step`` start this log, so that it covers the whole training
    as an uninterrupted run's does.
    """

    def __init__(self, path: str | Path, start_step: int | None = None, tensorboard: bool = False,
                 resumed_from: Path | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fields: list[str] | None = None
        earlier = None if resumed_from is None else Path(resumed_from).parent.parent / self.path.name
        if start_step is not None and earlier is not None and not self.path.exists() and earlier.is_file() \
                and earlier.resolve() != self.path.resolve():
            self.path.write_text(earlier.read_text())  # cut to start_step below, with the rest
        if start_step is not None and self.path.is_file():
            lines = self.path.read_text().splitlines(keepends=True)
            kept = lines[:1] + [line for line in lines[1:] if _row_step(line) <= start_step]
            if len(kept) < len(lines):
                self.path.write_text("".join(kept))
        if self.path.exists():
            with open(self.path) as fh:
                header = fh.readline().strip()
            self._fields = header.split(",") if header else None
        self._writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.path.parent / TENSORBOARD_DIR),
                                         purge_step=None if start_step is None else start_step + 1)

    def log(self, step: int, **values: float) -> None:
        row = {"step": step, "time": round(time.time(), 3), **{k: float(v) for k, v in values.items()}}
        if self._fields is None:
            self._fields = list(row)
            with open(self.path, "w", newline="") as fh:
                csv.writer(fh).writerow(self._fields)
        with open(self.path, "a", newline="") as fh:
            csv.writer(fh).writerow([row.get(k, "") for k in self._fields])
        if self._writer is not None:
            for name, value in values.items():
                self._writer.add_scalar(name, float(value), step, walltime=row["time"])
            self._writer.flush()  # a run stopped by a signal or a crash keeps what it logged, as the CSV does

    def image(self, step: int, name: str, image) -> None:
        """A PIL image (a validation grid) in TensorBoard's images tab; nothing without ``tensorboard``."""
        if self._writer is not None:
            import numpy as np

            self._writer.add_image(name, np.asarray(image.convert("RGB")), step, dataformats="HWC")
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def _row_step(line: str) -> float:
    try:
        return float(line.split(",", 1)[0])
    except ValueError:
        return math.inf  # not a row of ours: dropped with the steps after the start


TIMESTEP_SAMPLING = ("uniform", "logit_normal")


def check_timestep_sampling(sampling: str, uniform_share: float, logit_std: float = 1.0) -> None:
    """The options of ``draw_timesteps`` as a trainer's --timestep-sampling, --uniform-share and --logit-std
    give them."""
    if not 0.0 <= uniform_share <= 1.0 or (uniform_share and sampling != "logit_normal"):
        raise EgakuError(f"--uniform-share {uniform_share}: a share in [0, 1], with --timestep-sampling logit_normal")
    if not logit_std > 0:
        raise EgakuError(f"--logit-std {logit_std}: give a standard deviation above 0")


def draw_timesteps(n: int, num_train_timesteps: int, sampling: str = "uniform", logit_mean: float = 0.0,
                   logit_std: float = 1.0, uniform_share: float = 0.0,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` training timesteps in ``[0, num_train_timesteps)`` (CPU, int64).

    uniform, or logit_normal: t/T = sigmoid(N(logit_mean, logit_std)) as in SD3, most draws mid-schedule, with
    a share ``uniform_share`` of them drawn uniformly instead (the noisiest steps, where the layout is decided,
    are rare under logit-normal alone).
    """
    if sampling == "uniform":
        return torch.randint(0, num_train_timesteps, (n,), generator=generator)
    if sampling != "logit_normal":
        raise EgakuError(f"unknown timestep sampling {sampling!r}; choose from {', '.join(TIMESTEP_SAMPLING)}")
    u = torch.sigmoid(logit_mean + logit_std * torch.randn(n, generator=generator))
    if uniform_share > 0:  # drawn only then: runs without it keep their random sequence
        u = torch.where(torch.rand(n, generator=generator) < uniform_share, torch.rand(n, generator=generator), u)
    return (u * num_train_timesteps).long().clamp(0, num_train_timesteps - 1)


def min_snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Per-sample loss weights of min-SNR-gamma (Hang et al. 2023, "Efficient Diffusion Training via
    Min-SNR Weighting Strategy"): min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for v-prediction.

    A zero-terminal-SNR schedule's last timestep has SNR 0: its weight is 0 there, not 0/0.
    """
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    divisor = snr + 1 if prediction_type == "v_prediction" else snr
    return torch.clamp(snr, max=gamma) / divisor.clamp_min(1e-8)


def debiased_weights(noise_scheduler, timesteps: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """Per-sample loss weights of debiased estimation (Yu et al. 2024, "Unmasking Bias in Diffusion Model Training";
    kohya's --debiased_estimation_loss): 1 / sqrt(SNR) for epsilon, 1 / (SNR + 1) for v-prediction, SNR capped at
    1000 as kohya caps it (near timestep 0 it is huge). A zero-terminal-SNR schedule's last timestep has SNR 0: there
    epsilon's weight is taken at SNR 1e-3 (about 32), not infinity."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps).clamp(max=1000)
    return 1 / (snr + 1) if prediction_type == "v_prediction" else snr.clamp_min(1e-3).rsqrt()


LOSS_TYPES = ("l2", "huber", "smooth_l1", "l1")
HUBER_SCHEDULES = ("snr", "exponential", "constant")


def check_loss_type(loss_type: str, huber_c: float, huber_schedule: str) -> None:
    """A trainer's --loss-type, --huber-c and --huber-schedule."""
    if loss_type not in LOSS_TYPES:
        raise EgakuError(f"unknown --loss-type {loss_type!r}; choose from {', '.join(LOSS_TYPES)}")
    if huber_schedule not in HUBER_SCHEDULES:
        raise EgakuError(f"unknown --huber-schedule {huber_schedule!r}; choose from {', '.join(HUBER_SCHEDULES)}")
    if loss_type not in ("huber", "smooth_l1"):
        return
    if not 0 < huber_c <= 1 and huber_schedule != "constant":
        raise EgakuError(f"--huber-c {huber_c}: the {huber_schedule} schedule goes from 1 at the cleanest timestep "
                         "down to --huber-c at the noisiest, so give a value in (0, 1] (0.1 is kohya's default)")
    if not huber_c > 0:
        raise EgakuError(f"--huber-c must be above 0, got {huber_c}")


def huber_thresholds(noise_scheduler, timesteps: torch.Tensor, huber_c: float, schedule: str) -> torch.Tensor:
    """Per-sample threshold of the scheduled pseudo-Huber loss (Khrapov et al. 2024, "Improving Diffusion Models's
    Data-Corruption Resistance using Scheduled Pseudo-Huber Loss"; kohya's --huber_schedule): near 1 (almost
    L2) at the clean timesteps, where detail is learnt, down to ``huber_c`` (almost L1, robust to outliers) at
    the noisy ones. ``snr`` follows the noise level, ``exponential`` the timestep index."""
    if schedule == "constant":
        return torch.full(timesteps.shape, float(huber_c), device=timesteps.device)
    t = timesteps.detach().cpu()
    if schedule == "exponential":
        c = torch.exp(math.log(huber_c) * t.double() / noise_scheduler.config.num_train_timesteps)
    else:
        alphas_cumprod = noise_scheduler.alphas_cumprod[t].double()
        # a zero-terminal-SNR schedule's last alpha is 0: sigma is infinite there and the threshold is huber_c
        sigmas = ((1.0 - alphas_cumprod) / alphas_cumprod.clamp_min(1e-20)).sqrt()
        c = (1.0 - huber_c) / (1.0 + sigmas) ** 2 + huber_c
    return c.float().to(timesteps.device)


def elementwise_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str = "l2",
                     huber_c: torch.Tensor | None = None) -> torch.Tensor:
    """The loss of each element of ``pred`` against ``target`` (both (B, ...)), in fp32.

    huber is kohya's pseudo-Huber 2c(sqrt(d^2 + c^2) - c): d^2 for |d| << c and 2c|d| beyond, so one badly
    predicted region (a corrupt or mislabelled image) pulls linearly instead of quadratically; smooth_l1 is the
    same divided by c. It is computed as 2c d^2 / (sqrt(d^2 + c^2) + c), which is the same number without the
    cancellation of the difference at large c. ``huber_c``: (B,) thresholds from ``huber_thresholds``."""
    diff = pred.float() - target.float()
    if loss_type == "l2":
        return diff.square()
    if loss_type == "l1":
        return diff.abs()
    c = huber_c.float().to(diff.device).view(-1, *([1] * (diff.dim() - 1)))
    pseudo_huber = 2 * c * diff.square() / ((diff.square() + c.square()).sqrt() + c)
    if loss_type == "huber":
        return pseudo_huber
    if loss_type == "smooth_l1":
        return pseudo_huber / c
    raise EgakuError(f"unknown loss type {loss_type!r}; choose from {', '.join(LOSS_TYPES)}")


def half_precision_attention(device: torch.device, dtype: torch.dtype):
    """The attention kernel context for a forward pass under half-precision autocast on ``device``.

    On the CPU it is PyTorch's math kernel: the default flash kernel's bf16 backward there took a third of a
    whole UNet training step (bench/results/ldm_precision.json), where the math kernel's matmuls run at bf16
    speed. Elsewhere, and in fp32, PyTorch chooses as usual."""
    import contextlib

    if device.type != "cpu" or dtype not in (torch.bfloat16, torch.float16):
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)
