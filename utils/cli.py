"""The shared command-line vocabulary of the trainers: one flag name per setting, the old spellings as aliases.

The house names are diffusers' (``examples/*/train_*.py``): ``--train_batch_size``, ``--gradient_accumulation_steps``,
``--learning_rate``, ``--lr_warmup_steps``, ``--max_grad_norm``, ``--mixed_precision``, ``--dataloader_num_workers``,
``--seed``, ``--output_dir``, ``--resume_from_checkpoint``, ``--checkpointing_steps``, ``--checkpoints_total_limit``,
``--report_to``; plus ``--compile/--no-compile``, ``--device``, ``--checkpointing_minutes`` (Kaggle's session limit)
and ``--effective_batch`` (the DDPM trainer, which probes the batch that fits).

Every spelling the users' notes and earlier versions of the trainers used stays as an alias, shown in ``--help``:

* plain aliases are extra option strings of the same argparse action (``--batch_size`` is ``--train_batch_size``);
* aliases whose values differ are separate actions that write the house value into the same destination
  (``--no-amp`` sets ``mixed_precision`` to ``no``; ``--precision 16-mixed`` sets it to ``fp16``).

So ``args`` only ever holds house names and house values, a YAML preset may use either spelling (see
utils/config.py), and ``utils.config.explicitly_given`` sees an alias as its house flag.
"""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Sequence
from typing import Any

from utils.accelerator import PRECISION_CHOICES
from utils.validators import output_folder, seed

# Lightning's names (the users' DiT scripts) and older spellings -> accelerate's mixed_precision.
PRECISION_ALIASES = {
    "auto": "auto", "no": "no", "32": "no", "32-true": "no", "fp32": "no", "16-mixed": "fp16", "16": "fp16",
    "fp16": "fp16", "bf16-mixed": "bf16", "bf16": "bf16",
}
REPORT_TO_CHOICES = ("tensorboard", "wandb", "none")

# House name -> old spellings that mean exactly the same value.
ALIASES: dict[str, tuple[str, ...]] = {
    "train_batch_size": ("--batch_size",),
    "gradient_accumulation_steps": ("--grad_accum",),
    "learning_rate": ("--lr",),
    "lr_warmup_steps": ("--warmup_steps",),
    "max_grad_norm": ("--grad_clip", "--clip_grad"),
    "dataloader_num_workers": ("--num_workers", "--workers", "--threads"),
    "resume_from_checkpoint": ("--resume",),
    "checkpoints_total_limit": ("--keep_last",),
    "num_processes": ("--devices",),
}
# Keys of checkpoints' saved configs written before the house names (their resumes keep working).
RENAMED_KEYS = {old.lstrip("-"): house for house, olds in ALIASES.items() for old in olds}

_HELP = {
    "train_batch_size": "images per device and forward pass",
    "gradient_accumulation_steps": "forward passes per optimiser step; images per step = batch x processes x this",
    "effective_batch": "images per optimiser step over all processes and accumulation steps; the accumulation follows "
                       "from it and the batch that fits",
    "learning_rate": "peak learning rate",
    "lr_warmup_steps": "linear learning-rate warm-up in optimiser steps",
    "max_grad_norm": "clip the gradient norm to this value, 0 turns clipping off",
    "mixed_precision": "auto: bf16 where the GPU supports it, else fp16 with loss scaling; fp32 (no) on CPU",
    "compile": "torch.compile the model on CUDA (--no-compile turns it off)",
    "dataloader_num_workers": "data-loader worker processes (up to 8 on CUDA, 0 on CPU when not given)",
    "seed": "seed of initialisation, data order and noise",
    "output_dir": "root folder of the run's outputs",
    "resume_from_checkpoint": "checkpoint file to continue from, or 'latest' for the run's newest; settings not given on "
                              "the command line come from the checkpoint",
    "checkpointing_steps": "also write a resumable checkpoint every N optimiser steps, 0 turns it off",
    "checkpointing_minutes": "also write a resumable checkpoint every N minutes of training (e.g. before Kaggle's "
                             "session limit), 0 turns it off",
    "checkpoints_total_limit": "numbered checkpoints kept, 0 keeps all",
    "report_to": "experiment tracker through accelerate: tensorboard (offline event files in <run>/logs), wandb, or none",
    "device": "auto uses the GPU when there is one",
    "num_processes": "processes (GPUs) to train on with DDP; N > 1 re-launches the script through torch.distributed.run",
}
_TYPES: dict[str, Any] = {
    "train_batch_size": int, "gradient_accumulation_steps": int, "effective_batch": int, "learning_rate": float,
    "lr_warmup_steps": int, "max_grad_norm": float, "dataloader_num_workers": int, "seed": seed, "output_dir": output_folder,
    "resume_from_checkpoint": str, "checkpointing_steps": int, "checkpointing_minutes": float,
    "checkpoints_total_limit": int, "num_processes": int,
}
_METAVARS = {"learning_rate": "LR", "max_grad_norm": "NORM", "output_dir": "DIR", "resume_from_checkpoint": "PATH|latest",
             "checkpointing_minutes": "MIN", "seed": "SEED"}
HOUSE_NAMES = tuple(_HELP)


def tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None or importlib.util.find_spec("tensorboardX") is not None


def default_report_to() -> str:
    """tensorboard when it is installed (offline event files), else none."""
    return "tensorboard" if tensorboard_available() else "none"


def precision_value(value: str) -> str:
    """``--precision`` / ``--mixed_precision`` value -> accelerate's ``no|fp16|bf16|auto``."""
    key = str(value).strip().lower()
    if key not in PRECISION_ALIASES:
        raise argparse.ArgumentTypeError(f"'{value}' is not one of {', '.join(PRECISION_ALIASES)}")
    return PRECISION_ALIASES[key]


precision_value.translates = True  # utils.config applies it to YAML numbers too (`precision: 32`)


class OnePrecision(argparse.Action):
    """Store a precision flag's value; another spelling with another value on the same command line is an error.

    ``--no-amp``, ``--precision`` and ``--mixed_precision`` write one setting: argparse would keep the last one given,
    so ``--no-amp --mixed_precision bf16`` trained in bf16 on the CPU without a word.
    """

    def __call__(self, parser, namespace, values, option_string=None):
        value = self.const if self.nargs == 0 else values
        current = getattr(namespace, self.dest, None)
        if current is not None and current != parser.get_default(self.dest) and current != value:
            shown = option_string if self.nargs == 0 else f"{option_string} {value}"
            parser.error(f"{shown} contradicts the precision given before it ({current}); give one of --mixed_precision, "
                         "--precision or --no-amp")
        setattr(namespace, self.dest, value)


def _describe_default(name: str, value: Any) -> str:
    if name == "compile":
        return "on" if value else "off"
    if name == "report_to":
        return f"{default_report_to()}: tensorboard when installed, else none"
    return "none" if value is None else str(value)


def add_training_arguments(
    parser: argparse.ArgumentParser,
    *,
    defaults: dict[str, Any],
    include: set[str] | None = None,
    help: dict[str, str] | None = None,  # noqa: A002 - the argparse word
    title: str = "training (the names every trainer shares; old spellings listed as aliases)",
) -> argparse._ArgumentGroup:
    """Add the house flags named in ``include`` (default: the keys of ``defaults``) as one argument group.

    ``defaults`` gives this trainer's default per house name (``report_to`` defaults to :func:`default_report_to`);
    ``help`` replaces a flag's generic help with the trainer's own (its default's reason). The group is returned so
    that a trainer can add its family-specific flags beside them.
    """
    include = set(defaults) if include is None else set(include)
    unknown = include - set(HOUSE_NAMES)
    if unknown:
        raise ValueError(f"not house flags: {sorted(unknown)}")
    helps = {**_HELP, **(help or {})}
    group = parser.add_argument_group(title)
    for name in HOUSE_NAMES:  # a fixed order keeps every trainer's --help alike
        if name not in include:
            continue
        default = defaults.get(name)
        if name == "report_to" and default is None:
            default = default_report_to()
        text = f"{helps[name]} (default {_describe_default(name, default)})"
        aliases = ALIASES.get(name, ())
        if aliases:
            text += f" [alias: {', '.join(aliases)}]"
        text = text.replace("%", "%%")
        if name == "mixed_precision":
            group.add_argument("--mixed_precision", type=precision_value, choices=PRECISION_CHOICES, default=default,
                               metavar="{no,fp16,bf16,auto}", action=OnePrecision, help=text)
            group.add_argument("--precision", dest="mixed_precision", type=precision_value, metavar="P", action=OnePrecision,
                               help="alias of --mixed_precision in Lightning's names: 32 -> no, 16-mixed -> fp16, "
                                    "bf16-mixed -> bf16 (accelerate's names work too)")
            group.add_argument("--no-amp", dest="mixed_precision", action=OnePrecision, nargs=0, const="no",
                               help="alias of --mixed_precision no: train in fp32")
        elif name == "compile":
            group.add_argument("--compile", action=argparse.BooleanOptionalAction, default=default, help=text)
        elif name == "report_to":
            group.add_argument("--report_to", choices=REPORT_TO_CHOICES, default=default, help=text)
        elif name == "device":
            group.add_argument("--device", choices=("auto", "cuda", "cpu"), default=default, help=text)
        else:
            group.add_argument(f"--{name}", *aliases, dest=name, type=_TYPES[name], default=default,
                               metavar=_METAVARS.get(name, "N"), help=text)
    return group


def parse_training_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """A trainer's command line: the ``--config`` preset under the flags, ``args.given_flags`` (the flags typed, which
    a resumed run keeps over its checkpoint's values) and the house ranges checked."""
    from utils.config import explicitly_given, parse_with_config

    args = parse_with_config(parser, argv)
    args.given_flags = sorted(explicitly_given(parser, argv, args.config))
    check_training_arguments(parser, args)
    return args


def check_training_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """One ``error:`` line for a house value out of range (the flags the parser has)."""
    at_least_one = ("train_batch_size", "gradient_accumulation_steps", "effective_batch", "num_processes")
    not_negative = ("lr_warmup_steps", "max_grad_norm", "dataloader_num_workers", "checkpointing_steps",
                    "checkpointing_minutes", "checkpoints_total_limit")
    for name in at_least_one:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            parser.error(f"--{name} must be at least 1, got {value}")
    for name in not_negative:
        value = getattr(args, name, None)
        if value is not None and value < 0:
            parser.error(f"--{name} must not be negative, got {value}")
    rate = getattr(args, "learning_rate", None)
    if rate is not None and not rate > 0:
        parser.error(f"--learning_rate must be positive, got {rate}")
    if getattr(args, "report_to", "none") == "tensorboard" and not tensorboard_available():
        parser.error("--report_to tensorboard needs the tensorboard package; pip install tensorboard, or pass --report_to none")
    if getattr(args, "report_to", "none") == "wandb" and importlib.util.find_spec("wandb") is None:
        parser.error("--report_to wandb needs the wandb package; pip install wandb, or pass --report_to tensorboard")


def upgrade_saved_config(saved: dict) -> dict:
    """A checkpoint's saved config with today's house names (older checkpoints used the aliases as keys)."""
    upgraded = {}
    for key, value in saved.items():
        if key == "amp":
            upgraded.setdefault("mixed_precision", "auto" if value else "no")
        elif key == "precision":
            upgraded.setdefault("mixed_precision", PRECISION_ALIASES.get(str(value).lower(), value))
        elif key in RENAMED_KEYS:
            upgraded.setdefault(RENAMED_KEYS[key], value)
        else:
            upgraded[key] = value
    return upgraded


# Where SeeSR's test_seesr.py and train_seesr.py hard-code RAM's weights (relative to the current folder).
SEESR_RAM_PATH = "preset/models/ram_swin_large_14m.pth"


def add_ram_arguments(parser, fine_tuned: bool = True) -> None:
    """RAM/DAPE tagger flags of SeeSR, shared by ``infer.py seesr``, ``train_seesr_timestep.py`` and
    ``scripts/make_tags.py`` (a parser or group). ``fine_tuned=False`` (plain RAM only) hides ``--ram_ft_path`` from the
    help; the program refuses it with its reason."""
    parser.add_argument("--ram_path", default=SEESR_RAM_PATH,
                        help="RAM's weights ram_swin_large_14m.pth (default preset/models/ram_swin_large_14m.pth relative "
                        "to the current folder, where SeeSR's scripts read it)")
    parser.add_argument("--ram_ft_path", default=None,
                        help="SeeSR's DAPE.pth, loaded over RAM (degradation-aware tags and embeddings); default none: "
                        "plain RAM, as SeeSR" if fine_tuned else argparse.SUPPRESS)
    parser.add_argument("--ram_tag_list", default=None,
                        help="RAM's tag list ram_tag_list.txt, one tag per line (default: beside --ram_path, else "
                        "ram/data/ram_tag_list.txt under the current folder, as in SeeSR's code tree)")
    parser.add_argument("--ram_tag_thresholds", default=None,
                        help="RAM's per-tag thresholds ram_tag_list_threshold.txt (default: beside the tag list; 0.68 "
                        "for every tag when there is none)")


# ------------------------------------------------------------------------------------------ inference vocabulary
# infer.py's subcommands share one name per setting, diffusers' where it has one: --num_inference_steps,
# --mixed_precision no|fp16|bf16|auto (autocast while sampling), --device auto|cuda|cpu, --seed, --output_dir,
# --batch_size. A subcommand's older spelling stays as an alias: an extra option string of the same flag (--steps,
# --num_steps), or a flag of its own that writes the house value (--no-amp is --mixed_precision no).
def add_flag(parser, name: str, *aliases: str, help: str, **kwargs) -> argparse.Action:  # noqa: A002 - argparse's word
    """``name`` with the older spellings ``aliases`` as extra option strings of the same flag, listed in --help."""
    if aliases:
        help = f"{help} [alias: {', '.join(aliases)}]"
    return parser.add_argument(name, *aliases, help=help.replace("%", "%%"), **kwargs)


def add_precision_flags(parser, default: str, help: str, *, no_amp: bool = False, amp: bool = False, precision: bool = False) -> None:  # noqa: A002
    """``--mixed_precision no|fp16|bf16|auto`` and a subcommand's older spellings of it."""
    parser.add_argument("--mixed_precision", type=precision_value, choices=PRECISION_CHOICES, default=default,
                        metavar="{no,fp16,bf16,auto}", help=f"{help} (default {default})")
    if no_amp:
        parser.add_argument("--no-amp", dest="mixed_precision", action="store_const", const="no",
                            help="alias of --mixed_precision no: sample in fp32")
    if amp:
        parser.add_argument("--amp", dest="mixed_precision", action="store_const", const="auto",
                            help="alias of --mixed_precision auto: bf16 autocast where the GPU supports it, else fp16")
    if precision:
        parser.add_argument("--precision", dest="mixed_precision", type=precision_value, metavar="P",
                            help="alias of --mixed_precision: fp32 -> no, fp16, bf16, auto (Lightning's 32, 16-mixed, "
                            "bf16-mixed work too)")


def add_device_flag(parser) -> None:
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="default auto (GPU if present)")
