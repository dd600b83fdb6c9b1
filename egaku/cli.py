"""The `egaku` command line: one parser, each subcommand a plain typed function.

A command is ``def name(opts: SomeOptions) -> None`` living in the module that owns the concern; its
options dataclass becomes the flags (see ``egaku.config``). Modules are imported only for the command
that runs, so ``egaku --help`` and ``egaku info`` stay fast. No logic lives here.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import sys
import typing

from .config import add_arguments, build, load_preset, other_name_hint
from .errors import EgakuError

# name -> (module, function, one-line description)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "generate": ("egaku.inference.commands", "generate_command",
                 "generate images from a text prompt (and an init image)"),
    "info": ("egaku.inference.commands", "info_command",
             "print the generation parameters stored in an image (PNG, or A1111's JPEG/WebP), or what a LoRA "
             "file holds"),
    "convert": ("egaku.models.commands", "convert_command",
                "convert a model to a single-file .safetensors checkpoint or a diffusers folder"),
    "train-ldm": ("egaku.training.ldm", "train_ldm_command",
                  "train a latent diffusion model (VAE + text encoder + UNet) from scratch"),
    "train-lora": ("egaku.training.lora", "train_lora_command",
                   "fine-tune a Stable Diffusion pipeline with LoRA on an image folder"),
    "merge-lora": ("egaku.lora.commands", "merge_lora_command", "fuse a LoRA into a copy of its base model"),
    "train-gan": ("egaku.training.gan", "train_gan_command",
                  "train an MLP GAN or a DCGAN on handwritten digits or an image folder"),
    "sample-gan": ("egaku.gan.commands", "sample_gan_command", "write samples and a grid from a trained GAN"),
    "eval adherence": ("egaku.evaluation.adherence", "eval_adherence_command",
                       "score prompt adherence of a diffusion model on the shapes world"),
    "eval gan": ("egaku.evaluation.gan_eval", "eval_gan_command", "score a GAN's samples with the digit classifier"),
    "serve": ("egaku.server.app", "serve_command", "serve models over an OpenAI-compatible images API and a web page"),
}


def _resolve(name: str):
    module_name, func_name, _ = COMMANDS[name]
    func = getattr(importlib.import_module(module_name), func_name)
    hints = typing.get_type_hints(func)
    opts_cls = next(v for k, v in hints.items() if k != "return")
    return func, opts_cls


def _top_parser() -> argparse.ArgumentParser:
    lines = "\n".join(f"  {n:<12} {d}" for n, (_, _, d) in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="egaku",
        description="egaku: image generation, fine-tuning and training.",
        epilog=f"commands:\n{lines}\n\nRun `egaku COMMAND --help` for a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("command", choices=sorted({c.split()[0] for c in COMMANDS}), metavar="COMMAND")
    return parser


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: a mistyped flag is named with the flag it was probably meant to be
    (kohya's ``--learning_rate`` is egaku's ``--learning-rate``), not buried under the whole usage text. Flags are
    matched whole (``allow_abbrev=False``): a prefix would take ``--learning-rat`` for ``--learning-rate`` without a
    word, and call ``--lr`` ambiguous between --lr-scheduler and --lr-warmup-steps instead of naming
    --learning-rate."""

    argv: list[str] = []  # what parse_args was given, to see which flag a left-over word followed

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str) -> typing.NoReturn:
        if message.startswith("unrecognized arguments:"):
            known = [s for action in self._actions for s in action.option_strings if s.startswith("--")]
            hints = []
            # "--target-modules to_q to_k": a list flag takes one value per flag, so the second is left over (where
            # a command takes a positional argument, a left-over word may as well be a second prompt)
            repeated = {s for a in self._actions if isinstance(a, argparse._AppendAction) for s in a.option_strings}
            positional = any(not a.option_strings for a in self._actions)
            for word in message.split(":", 1)[1].split():
                if not word.startswith("-"):
                    before = self.argv[:self.argv.index(word)] if word in self.argv else []
                    flags = [w.split("=", 1)[0] for w in before if w.startswith("-")]
                    if flags and flags[-1] in repeated and not positional:
                        hints.append(f"{word} -> {flags[-1]} {word} ({flags[-1]} takes one value per flag: repeat it)")
                    continue
                flag = word.split("=", 1)[0]
                dashed = "--" + flag.lstrip("-").replace("_", "-")
                other = other_name_hint(flag, (k[2:].replace("-", "_") for k in known))
                if other:  # kohya's --network_dim is egaku's --rank: no spelling of one is close to the other
                    ours, whose = other
                    hints.append(f"{flag} -> --{ours.replace('_', '-')}" + (f" ({whose})" if whose else ""))
                    continue
                close = [dashed] if dashed in known else difflib.get_close_matches(dashed, known, n=2, cutoff=0.7)
                if close:
                    hints.append(f"{flag} -> {' or '.join(close)}")
            if hints:
                message += f" (did you mean: {'; '.join(hints)}?)"
        self.exit(2, f"{self.prog}: error: {message}\nRun `{self.prog} --help` for its options.\n")


def build_parser(name: str) -> tuple[argparse.ArgumentParser, typing.Callable, type]:
    func, opts_cls = _resolve(name)
    parser = _Parser(prog=f"egaku {name}", description=COMMANDS[name][2])
    parser.add_argument("--config", help="preset whose values the flags below override: TOML, YAML, or a run's "
                        "saved config JSON (to repeat that run)")
    add_arguments(parser, opts_cls)
    return parser, func, opts_cls


def parse(argv: list[str]) -> tuple[typing.Callable, object]:
    """Turn argv (without the program name) into (function, options)."""
    if not argv or argv[0] in ("-h", "--help"):
        _top_parser().print_help()
        raise SystemExit(0)
    # two-word commands ("eval gan") take the first two words
    words = 2 if len(argv) > 1 and " ".join(argv[:2]) in COMMANDS else 1
    name = " ".join(argv[:words])
    if name not in COMMANDS:
        groups = sorted(c for c in COMMANDS if c.startswith(name + " "))
        if groups:
            raise EgakuError(f"`egaku {name}` needs one of: {', '.join(g.split()[1] for g in groups)}")
        _top_parser().parse_args(argv[:1])  # prints the list of valid commands and exits 2
    parser, func, opts_cls = build_parser(name)
    parser.argv = argv[words:]
    ns = vars(parser.parse_args(argv[words:]))
    preset_path = ns.pop("config", None)
    preset = load_preset(preset_path) if preset_path else {}
    return func, build(opts_cls, preset, ns)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    for name in ("stdout", "stderr"):
        if getattr(sys, name) is None:
            # a stream the caller closed (`egaku generate ... >&-`) is None in Python, and the first flush or progress
            # bar would fail with a traceback: what would go there is dropped instead, and the work still done
            setattr(sys, name, open(os.devnull, "w"))
    try:
        func, opts = parse(argv)
        func(opts)
        sys.stdout.flush()  # output still buffered meets a closed pipe here, not in the interpreter's flush at exit
    except EgakuError as exc:
        print(f"egaku: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if int(os.environ.get("RANK", "0")) == 0:  # once for a distributed run: its other processes stop alike
            print("egaku: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader of stdout went away (`egaku info x.png | head -1`): nothing more can be said to it, and a
        # traceback would say it is egaku's error. 141 (128 + SIGPIPE) is the status the shell gives cat or grep
        # stopped the same way, so a `set -o pipefail` script meets egaku as it meets them, and can tell it from a
        # failure (1, 2). stdout is pointed at /dev/null so that the interpreter's flush at exit does not raise again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return 0


if __name__ == "__main__":
    sys.exit(main())
