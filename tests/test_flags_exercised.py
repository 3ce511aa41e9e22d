"""Every flag of the four trainers and of every ``infer.py`` sub-command is exercised somewhere.

:func:`test_every_flag_is_named_by_a_test_or_a_tested_doc_cell` reads each program's own parser and looks for each
flag's spellings in tests/*.py and docs/*.md (whose Kaggle cells tests/test_kaggle_cells.py runs): a new flag that no
test passes fails here. The flags that no other test passed when this file was written are exercised below: where it
is cheap, through what they change (the SeeSR data flags build the dataset); otherwise through the parser, that the
flag is accepted and lands in its setting with the given value (``PARSE_ONLY``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROGRAMS = ("train_ddpm_highres", "train_phaseformer", "train_dit_user", "train_seesr_timestep", "train_dape", "infer")


def program_parser(module_name: str) -> argparse.ArgumentParser:
    """The parser ``module.parse_args`` builds (the largest one it parses with: trainers probe --config first)."""
    module = importlib.import_module(module_name)
    seen, original = [], argparse.ArgumentParser.parse_known_args

    def watching(self, *args, **kwargs):
        seen.append(self)
        return original(self, *args, **kwargs)

    argparse.ArgumentParser.parse_known_args = watching
    try:
        with contextlib.redirect_stdout(io.StringIO()), pytest.raises(SystemExit):
            module.parse_args(["--help"])
    finally:
        argparse.ArgumentParser.parse_known_args = original
    return max(seen, key=lambda parser: len(parser._actions))


def option_lists(parser: argparse.ArgumentParser, prefix: str = "") -> list[tuple[str, list[str]]]:
    """``(where, option strings)`` of every flag, sub-commands' flags included."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += option_lists(sub, f"{prefix}{name} ")
        elif action.option_strings and action.dest != "help":
            found.append((prefix, list(action.option_strings)))
    return found


def test_every_flag_is_named_by_a_test_or_a_tested_doc_cell():
    corpus = "\n".join(path.read_text() for folder, pattern in (("tests", "*.py"), ("docs", "*.md"))
                       for path in sorted((ROOT / folder).glob(pattern)))
    missing = []
    for program in PROGRAMS:
        for where, options in option_lists(program_parser(program)):
            if not any(re.search(re.escape(option) + r"(?![\w-])", corpus) for option in options):
                missing.append(f"{program} {where}{options[0]}")
    assert missing == [], "flags no test passes (add them to a test, or to PARSE_ONLY below): " + ", ".join(missing)


SD2 = ["--pretrained_model_path", "sd2", "--train_data_dir", "HR"]  # SeeSR's required flags (paths are checked when the run starts)

# Flags of the trainers that no other test passed: (program, minimal command line, flag and value, setting, expected).
PARSE_ONLY = [
    ("train_phaseformer", ["--dataset_path", "LSUI"], ["--resize_mode", "random_crop"], "resize_mode", "random_crop"),
    ("train_phaseformer", ["--dataset_path", "LSUI"], ["--flips", "both"], "flips", "both"),
    ("train_phaseformer", ["--dataset_path", "LSUI"], ["--beta1", "0.8"], "beta1", 0.8),
    ("train_phaseformer", ["--dataset_path", "LSUI"], ["--num_preview", "3"], "num_preview", 3),
    ("train_dit_user", ["--latent_dir", "latents"], ["--no-ema_warmup"], "ema_warmup", False),
    ("train_dit_user", ["--latent_dir", "latents"], ["--preview_batch_size", "3"], "preview_batch_size", 3),
    ("train_seesr_timestep", SD2, ["--lr_num_cycles", "3"], "lr_num_cycles", 3),
    ("train_seesr_timestep", SD2, ["--lr_power", "2.0"], "lr_power", 2.0),
    ("train_seesr_timestep", SD2, ["--adam_beta1", "0.8"], "adam_beta1", 0.8),
    ("train_seesr_timestep", SD2, ["--adam_weight_decay", "0.02"], "adam_weight_decay", 0.02),
    ("train_seesr_timestep", SD2, ["--adam_epsilon", "1e-7"], "adam_epsilon", 1e-7),
    ("train_seesr_timestep", SD2, ["--allow_tf32"], "allow_tf32", True),  # off by default, as SeeSR
    ("train_seesr_timestep", SD2, ["--allow_tf32", "--no_tf32"], "allow_tf32", False),
    ("train_seesr_timestep", SD2, ["--prompt_cache_size", "5"], "prompt_cache_size", 5),
    ("train_seesr_timestep", SD2, ["--validation_image", "a.png", "b.png"], "validation_image", ["a.png", "b.png"]),
    ("train_seesr_timestep", SD2, ["--validation_guidance_scale", "3.0"], "validation_guidance_scale", 3.0),
    ("train_seesr_timestep", SD2, ["--validation_process_size", "256"], "validation_process_size", 256),
    ("train_dape", ["--root_folders", "data"], ["--num_processes", "2"], "num_processes", 2),
    ("train_dape", ["--root_folders", "data"], ["--checkpointing_minutes", "30"], "checkpointing_minutes", 30.0),
]


@pytest.mark.parametrize("program, base, flag, setting, expected", PARSE_ONLY, ids=[" ".join(row[2]) for row in PARSE_ONLY])
def test_flag_lands_in_its_setting(program, base, flag, setting, expected):
    module = importlib.import_module(program)
    default = getattr(module.parse_args(base), setting)
    value = getattr(module.parse_args([*base, *flag]), setting)
    assert value == expected
    if flag[0] != "--allow_tf32" and flag[-1] != "--allow_tf32":
        assert value != default  # the flag changes something


def test_seesr_data_flags_reach_the_training_dataset(demo_images, tmp_path):
    """--scale, --degradation_options and --no_random_flip change the dataset the trainer builds."""
    import train_seesr_timestep as train
    from recipes.seesr import build_training_dataset

    options = tmp_path / "degradation.yaml"
    options.write_text("gaussian_noise_prob: 0.0\njpeg_range: [80, 90]\n")
    base = ["--pretrained_model_path", "sd2", "--train_data_dir", str(demo_images), "--resolution", "16"]
    default = build_training_dataset(train.parse_args(base), seed=0)
    changed = build_training_dataset(
        train.parse_args([*base, "--scale", "2", "--degradation_options", str(options), "--no_random_flip"]), seed=0
    )
    assert (default.degradation.scale, default.random_flip) == (4, True)
    assert (changed.degradation.scale, changed.random_flip) == (2, False)
    assert changed.degradation.gaussian_noise_prob == 0.0 and tuple(changed.degradation.jpeg_range) == (80, 90)
    assert default.degradation.gaussian_noise_prob > 0
