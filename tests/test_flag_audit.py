"""Every numeric flag of every entry point, probed with 0, -1 and a huge value at parse time.

Each entry point has a table: flag -> the probe values it accepts. A probe outside that set must end in one
``error:`` line naming the flag (exit status 2); a probe inside it must parse. A numeric flag missing from its
table fails the test, so a new flag cannot arrive without a stated range. Only the parsers run: no model is built.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HUGE_INT, HUGE_FLOAT = "1000000000000", "1e30"

# What a flag accepts of the probes 0, -1 and huge.
POSITIVE = frozenset({"huge"})  # at least 1 (or > 0), no upper bound at parse time
NON_NEGATIVE = frozenset({"0", "huge"})  # 0 turns something off or is a valid count
BOUNDED = frozenset({"0"})  # a range starting at 0 with an upper bound: [0, 1), [0, 1], seeds, guidance up to 100
NONE = frozenset()  # 0, -1 and huge all refused (e.g. DDPM's --size: one of the UNet presets' sizes)
ANY = frozenset({"0", "-1", "huge"})  # documented as accepted whatever the value (ignored, or checked against a checkpoint)

HOUSE = {  # the shared training flags (utils/cli.py)
    "--train_batch_size": POSITIVE, "--gradient_accumulation_steps": POSITIVE, "--effective_batch": POSITIVE,
    "--learning_rate": POSITIVE, "--lr_warmup_steps": NON_NEGATIVE, "--max_grad_norm": NON_NEGATIVE,
    "--dataloader_num_workers": NON_NEGATIVE, "--seed": BOUNDED, "--checkpointing_steps": NON_NEGATIVE,
    "--checkpointing_minutes": NON_NEGATIVE, "--checkpoints_total_limit": NON_NEGATIVE, "--num_processes": POSITIVE,
}

ENTRY_POINTS = {
    "train_ddpm_highres.py": ("train_ddpm_highres", [], None, {
        **HOUSE, "--size": NONE,
        "--train_batch_size": NONE,  # a huge batch is no divisor of the default --effective_batch 32: refused, both named
        "--dropout": BOUNDED, "--epochs": POSITIVE, "--ema_decay": BOUNDED,
        "--save_every": POSITIVE, "--sample_every": POSITIVE, "--quick_every": NON_NEGATIVE, "--num_samples": POSITIVE,
        "--sample_steps": POSITIVE, "--quick_steps": POSITIVE, "--fid_every": NON_NEGATIVE, "--fid_samples": POSITIVE,
    }),
    "train_phaseformer.py": ("train_phaseformer", ["--dataset_path", "d"], None, {
        **HOUSE, "--crop_size": POSITIVE, "--test_split": POSITIVE, "--split_seed": BOUNDED, "--niter": NON_NEGATIVE,
        "--niter_decay": NON_NEGATIVE, "--warmup": NON_NEGATIVE, "--beta1": BOUNDED, "--loss_weights_lr": NON_NEGATIVE,
        "--eval_every": POSITIVE, "--eval_size": POSITIVE, "--num_preview": NON_NEGATIVE, "--save_every": POSITIVE,
        "--stop_epoch": POSITIVE,
        "--crop_border": BOUNDED,  # checked against --eval_size (256 by default)
    }),
    "train_dit_user.py": ("train_dit_user", ["--latent_dir", "d"], None, {
        **HOUSE, "--patch_size": POSITIVE, "--num_users": POSITIVE, "--cfg_dropout": BOUNDED, "--num_train_timesteps": POSITIVE,
        "--max_epochs": POSITIVE, "--adam_beta2": BOUNDED, "--weight_decay": NON_NEGATIVE, "--ema_decay": BOUNDED,
        "--val_every": POSITIVE, "--val_time_bins": BOUNDED, "--preview_every": NON_NEGATIVE, "--preview_users": POSITIVE,
        "--preview_samples": POSITIVE, "--preview_steps": POSITIVE, "--preview_batch_size": POSITIVE, "--sample_steps": POSITIVE,
        "--guidance_scale": BOUNDED, "--guidance_interval": BOUNDED, "--shift": POSITIVE, "--guidance_channels": POSITIVE,
        "--save_every": NON_NEGATIVE,
    }),
    "train_seesr_timestep.py": ("train_seesr_timestep", ["--pretrained_model_name_or_path", "p", "--output_dir", "o",
                                                         "--root_folders", "r"], None, {
        **HOUSE, "--conditioning_embedding_channels": POSITIVE, "--timestep_table_bins": POSITIVE,
        "--scale": NONE,  # --resolution (512 by default) must be divisible by it
        "--resolution": POSITIVE, "--null_text_ratio": BOUNDED, "--injector_learning_rate": NON_NEGATIVE,
        "--lr_num_cycles": POSITIVE, "--lr_power": NON_NEGATIVE, "--adam_beta1": BOUNDED, "--adam_beta2": BOUNDED,
        "--adam_weight_decay": NON_NEGATIVE, "--adam_epsilon": POSITIVE, "--max_train_steps": POSITIVE,
        "--num_train_epochs": POSITIVE, "--prompt_cache_size": NON_NEGATIVE, "--logging_steps": POSITIVE,
        "--validation_steps": NON_NEGATIVE, "--num_validation_images": NON_NEGATIVE,
        "--validation_num_inference_steps": POSITIVE, "--validation_guidance_scale": BOUNDED,
        "--validation_process_size": POSITIVE,
    }),
    "infer.py ddpm": ("infer", ["ddpm", "--model", "m"], "ddpm", {
        "--num_samples": POSITIVE, "--num_inference_steps": POSITIVE, "--eta": BOUNDED, "--seed": BOUNDED,
        "--batch_size": POSITIVE, "--frames": POSITIVE,
    }),
    "infer.py phaseformer": ("infer", ["phaseformer", "--checkpoint", "c", "--input", "i", "--output_dir", "o"], "phaseformer", {
        "--tile": NON_NEGATIVE, "--tile_overlap": NON_NEGATIVE, "--resize": POSITIVE,
        "--crop_border": NON_NEGATIVE,  # checked against each image before any is written
    }),
    "infer.py seesr": ("infer", ["seesr", "--pretrained_model_path", "p", "--seesr_model_path", "s", "--image_path", "i",
                                 "--output_dir", "o"], "seesr", {
        "--start_steps": NON_NEGATIVE, "--lr_start_timestep": NON_NEGATIVE,  # checked against the scheduler's timesteps
        "--num_inference_steps": POSITIVE, "--guidance_scale": BOUNDED, "--conditioning_scale": NON_NEGATIVE,
        "--blending_alpha": ANY,  # accepted for SeeSR's command lines and unused, as in SeeSR
        "--control_guidance_start": BOUNDED, "--control_guidance_end": BOUNDED, "--control_scale_start": NON_NEGATIVE,
        "--process_size": POSITIVE, "--upscale": POSITIVE, "--seed": BOUNDED, "--sample_times": POSITIVE,
        "--latent_tiled_size": POSITIVE, "--latent_tiled_overlap": NON_NEGATIVE,
        "--vae_encoder_tiled_size": NON_NEGATIVE, "--vae_decoder_tiled_size": NON_NEGATIVE,  # 0 turns tiling off
    }),
    "infer.py user": ("infer", ["user", "--dit_checkpoint", "c"], "user", {
        "--scaling_factor": POSITIVE, "--num_users": POSITIVE,
        "--user_ids": ANY,  # checked against the checkpoint's users before sampling
        "--num_samples_per_user": POSITIVE, "--start_index": NON_NEGATIVE, "--guidance_scale": BOUNDED,
        "--guidance_interval": BOUNDED, "--guidance_channels": POSITIVE, "--num_inference_steps": POSITIVE,
        "--shift": POSITIVE, "--eta": BOUNDED, "--seed": BOUNDED, "--batch_size": POSITIVE,
    }),
    "scripts/extract_features.py": ("scripts.extract_features", ["--data_dir", "d", "--vavae_path", "v", "--output_path", "o"], None, {
        "--batch_size": POSITIVE, "--image_size": POSITIVE, "--val_fraction": BOUNDED, "--num_users": POSITIVE,
        "--seed": BOUNDED, "--num_workers": NON_NEGATIVE,
    }),
    "scripts/run_user_pipeline.py": ("scripts.run_user_pipeline", ["--data_dir", "d", "--vavae_path", "v", "--output_dir", "o"], None, {
        "--image_size": POSITIVE, "--val_fraction": BOUNDED, "--extract_batch_size": POSITIVE, "--batch_size": POSITIVE,
        "--max_epochs": POSITIVE, "--lr": POSITIVE, "--devices": POSITIVE, "--generate_user_ids": POSITIVE,
        "--num_samples_per_user": POSITIVE, "--guidance_scale": BOUNDED, "--num_steps": POSITIVE, "--seed": BOUNDED,
    }),
    "scripts/eval_sr.py": ("scripts.eval_sr", ["--results", "r", "--gt", "g"], None, {
        "--crop_border": NON_NEGATIVE,  # checked against every image before any network loads
    }),
    "scripts/eval_user_generation.py": ("scripts.eval_user_generation", ["--data_dir", "d", "--output_dir", "o"], None, {
        "--image_size": POSITIVE, "--val_fraction": NONE, "--seed": BOUNDED, "--classifier_size": POSITIVE,
        "--classifier_epochs": POSITIVE, "--classifier_batch_size": POSITIVE, "--classifier_lr": POSITIVE,
    }),
    "scripts/eval_generation.py": ("scripts.eval_generation", ["--samples", "s"], None, {
        "--batch_size": POSITIVE, "--kid_subset_size": POSITIVE, "--kid_subsets": POSITIVE, "--isc_splits": POSITIVE,
        "--prc_neighborhood": POSITIVE, "--seed": BOUNDED,
    }),
}
PAIRED_DATA = {"--start_gpu": NON_NEGATIVE, "--batch_size": POSITIVE, "--epoch": POSITIVE, "--gt_size": POSITIVE,
               "--seed": BOUNDED, "--dataloader_num_workers": NON_NEGATIVE}
ENTRY_POINTS["scripts/make_paired_data.py"] = ("scripts.make_paired_data", ["--gt_path", "g"], None, PAIRED_DATA)
ENTRY_POINTS["scripts/make_paired_data_dape.py"] = ("scripts.make_paired_data_dape", ["--gt_path", "g"], None, PAIRED_DATA)
ENTRY_POINTS["scripts/make_tags.py"] = ("scripts.make_tags", [], None, {
    "--start_gpu": BOUNDED,  # a shard index, below --all_gpu (1 by default)
    "--all_gpu": POSITIVE,
})
if (ROOT / "train_dape.py").is_file():  # the DAPE trainer, audited once it exists (its table is added with it)
    ENTRY_POINTS["train_dape.py"] = ("train_dape", ["--root_folders", "r"], None, {
        **HOUSE, "--num_validation_images": NON_NEGATIVE, "--image_size": POSITIVE, "--lora_rank": POSITIVE,
        "--drop_path_rate": BOUNDED, "--head_dropout": BOUNDED, "--max_train_steps": POSITIVE, "--lr_milestones": POSITIVE,
        "--lr_gamma": NONE, "--adam_weight_decay": NON_NEGATIVE, "--validation_steps": NON_NEGATIVE,
    })
# The research drivers and the demo's data and grid tools.
ENTRY_POINTS["scripts/phaseformer_evidence.py"] = ("scripts.phaseformer_evidence", [], None, {
    "--size": POSITIVE, "--train_count": POSITIVE, "--test_count": POSITIVE, "--epochs": POSITIVE, "--batch_size": POSITIVE,
    "--lr": POSITIVE, "--warmup": NON_NEGATIVE, "--loss_weights_lr": NON_NEGATIVE, "--eval_every": POSITIVE, "--seed": BOUNDED,
    "--threads": POSITIVE,
})
ENTRY_POINTS["scripts/user_conditioning_evidence.py"] = ("scripts.user_conditioning_evidence", [], None, {
    "--num_users": NONE,  # 2 to the number of pattern families
    "--train_per_user": POSITIVE, "--test_per_user": POSITIVE, "--size": POSITIVE, "--patch_size": POSITIVE, "--epochs": POSITIVE,
    "--batch_size": POSITIVE, "--lr": POSITIVE, "--ema_decay": BOUNDED, "--classifier_epochs": POSITIVE, "--threads": POSITIVE,
    "--seed": BOUNDED, "--guidance_scales": BOUNDED, "--samples_per_user": POSITIVE, "--num_steps": POSITIVE,
})
ENTRY_POINTS["scripts/create_comparison_grid.py"] = ("scripts.create_comparison_grid", ["--inputs", "i"], None, {
    "--tile_size": POSITIVE, "--columns": POSITIVE,
})
ENTRY_POINTS["scripts/make_demo_data.py images"] = ("scripts.make_demo_data", ["images", "o"], "images", {
    "--size": POSITIVE, "--count": POSITIVE, "--seed": BOUNDED,
})
ENTRY_POINTS["scripts/make_demo_data.py underwater"] = ("scripts.make_demo_data", ["underwater", "o"], "underwater", {
    "--size": POSITIVE, "--train_count": POSITIVE, "--test_count": POSITIVE, "--seed": BOUNDED,
})


PATH_TYPES = ("precision_value", "output_folder", "output_file")  # validated, but not numbers


def _numeric(action: argparse.Action) -> bool:
    name = getattr(action.type, "__name__", "")
    return bool(action.option_strings) and action.type not in (None, str, Path) and name not in PATH_TYPES


def _parsers(module, base: list[str]) -> list[argparse.ArgumentParser]:
    """Every parser the entry point builds while parsing ``base`` (infer.py builds one per subcommand)."""
    made = []
    original = argparse.ArgumentParser.__init__

    def record(self, *args, **kwargs):
        original(self, *args, **kwargs)
        made.append(self)

    argparse.ArgumentParser.__init__ = record
    try:
        module.parse_args(base)
    finally:
        argparse.ArgumentParser.__init__ = original
    return made


def _parse(module, argv: list[str]) -> tuple[bool, str]:
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            module.parse_args(argv)
    except SystemExit as exit_:
        assert exit_.code == 2, f"{argv}: exit status {exit_.code}"
        return False, err.getvalue()
    return True, err.getvalue()


def _huge(action: argparse.Action) -> str:
    """A huge value of the flag's kind: a whole number for whole-number flags (which refuse "1e30" as not whole)."""
    try:
        whole = isinstance(action.type("64"), int)
    except (argparse.ArgumentTypeError, ValueError) as err:
        whole = "whole number" in str(err)
    return HUGE_INT if whole else HUGE_FLOAT


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_every_numeric_flag_has_a_rule_and_keeps_it(entry):
    module_name, base, subcommand, rules = ENTRY_POINTS[entry]
    module = importlib.import_module(module_name)
    parsers = _parsers(module, base)
    parser = next(p for p in parsers if subcommand is None or p.prog.endswith(f" {subcommand}"))
    actions = [a for a in getattr(parser, "flags", parser._actions) if _numeric(a)]
    missing = [a.option_strings[0] for a in actions if a.option_strings[0] not in rules]
    assert not missing, f"{entry}: numeric flags without a rule in this table: {missing}"
    failures = []
    for action in actions:
        flag = action.option_strings[0]
        count = action.nargs if isinstance(action.nargs, int) else 1
        for probe, text in (("0", "0"), ("-1", "-1"), ("huge", _huge(action))):
            accepted, stderr = _parse(module, [*base, flag, *[text] * count])
            expected = probe in rules[flag]
            if accepted != expected:
                failures.append(f"{flag} {text}: {'accepted' if accepted else 'refused'} ({stderr.strip()})")
            elif not accepted:
                lines = [line for line in stderr.splitlines() if line.strip()]
                named = any(option in stderr for option in action.option_strings)
                if len(lines) != 1 or not lines[0].startswith("error:") or not named:
                    failures.append(f"{flag} {text}: not one error line naming the flag: {stderr!r}")
    assert not failures, f"{entry}:\n" + "\n".join(failures)


def test_every_script_with_numeric_flags_is_audited():
    audited = {module for module, *_ in ENTRY_POINTS.values()}
    for script in sorted((ROOT / "scripts").glob("*.py")):
        source = script.read_text()
        if "def parse_args" not in source or not any(f"type={t}" in source for t in ("int", "float", "positive", "non_neg")):
            continue
        name = script.stem
        assert f"scripts.{name}" in audited, f"scripts/{script.name} has numeric flags and no audit table"
