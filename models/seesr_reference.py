"""Where ``infer.py seesr`` and ``train_seesr_timestep.py`` knowingly differ from SeeSR (cswry/SeeSR), as data.

SeeSR (Wu et al., CVPR 2024): ``test_seesr.py``, ``test_seesr_turbo.py``, ``pipelines/pipeline_seesr.py``,
``utils/vaehook.py``, ``train_seesr.py``. The defaults here are SeeSR's behaviour; each row below is a place where
they are not, kept because ours is better or because SeeSR's cannot be reproduced (unseeded randomness, a loop that
never ends), with the flag that changes it where there is one. ``docs/seesr.md`` shows this table
(:func:`differences_markdown`), and a test keeps the two equal.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Difference:
    """One row: what SeeSR does, what this repository does, why, and the flag concerned ("" when none)."""

    topic: str
    seesr: str
    ours: str
    why: str
    flag: str = ""


SEESR_DIFFERENCES: tuple[Difference, ...] = (
    Difference(
        "tiled VAE statistics",
        "`vaehook.py` pools GroupNorm statistics by averaging per-tile variances of padded tiles, runs the mid "
        "block's self-attention per tile",
        "exact pooled mean/variance of the tile cores (Chan's formula in fp32); the latent-resolution middle runs "
        "once on the whole map",
        "the tiled result equals the untiled one: no colour seams, no per-tile attention",
        "`--vae_encoder_tiled_size`, `--vae_decoder_tiled_size` (0: untiled)",
    ),
    Difference(
        "noise per image",
        "one generator for the whole folder: an image's noise depends on the images before it",
        "each image restarts from `--seed` (a random, printed seed when none is given)",
        "an image's result does not depend on the others; any image can be redone alone",
        "`--seed`",
    ),
    Difference(
        "LR latent sample",
        "`vae.encode(...).latent_dist.sample()` from the global RNG (unseeded)",
        "sampled with the image's generator",
        "reproducible from `--seed`",
    ),
    Difference(
        "`--start_steps`",
        "parsed by `test_seesr.py` and never passed on: the pipeline always noises to 999",
        "the LR latent is noised to it and the scheduled steps above it are skipped",
        "the flag means what it says; the default 999 is SeeSR's computation",
        "`--start_steps` (alias `--lr_start_timestep`)",
    ),
    Difference(
        "latent tile window",
        "Gaussian centred at `(w - 1) / 2` across but `h / 2` down (half a latent pixel off)",
        "symmetric Gaussian, centred at `(side - 1) / 2` both ways",
        "tiles blend symmetrically; same tiles, same placement",
        "`--latent_tiled_size`, `--latent_tiled_overlap`",
    ),
    Difference(
        "tile overlap not below the tile side",
        "the tile grid loop never ends (an overlap >= `min(tile, short side)`)",
        "one `error:` line naming `--latent_tiled_overlap`",
        "a hang is not an answer",
        "`--latent_tiled_overlap`",
    ),
    Difference(
        "colour fix input and rounding",
        "AdaIN/wavelet on the 8-bit PIL output, the result truncated to 8 bits (`ToPILImage`)",
        "on the decoded image in floating point, rounded to 8 bits once afterwards",
        "one rounding instead of two; SeeSR's truncation makes its images half a level darker on average",
        "`--align_method`",
    ),
    Difference(
        "SeeSR-Turbo's UNet",
        "`from_pretrained_orig` merges the image attentions with `strict=False`: missing or extra ones pass silently",
        "every image attention must come from the checkpoint with its shape, else one `error:` line",
        "a base of another layout would otherwise run with random image attentions",
        "`--pretrained_model_path`",
    ),
    Difference(
        "precision on the CPU",
        "`--mixed_precision fp16` casts the weights to fp16 everywhere (its autocast is CUDA's only)",
        "`auto` (the default): fp16 on CUDA as SeeSR, fp32 on the CPU",
        "fp16 convolutions are slow or missing on CPUs",
        "`--mixed_precision`",
    ),
    Difference(
        "training seed",
        "`train_seesr.py` without `--seed` runs unseeded: the run cannot be repeated",
        "a random seed is drawn, logged and saved in `args.yaml` and every checkpoint",
        "`--seed N` repeats a run, and a resume continues exactly",
        "`--seed`",
    ),
    Difference(
        "GT tags without tag files",
        "the dataset needs `make_tags.py`'s `tag/` files (plain RAM)",
        "tag files are read; a GT without one is tagged online by plain RAM, as `make_tags.py` would (the log says so)",
        "training straight from HR folders without an offline tagging pass",
        "`--ram_path`",
    ),
    Difference(
        "training previews",
        "`log_validation` runs diffusers' ControlNet pipeline with UniPC, 20 steps, on `--validation_prompt`, "
        "without RAM embeddings",
        "`infer.py seesr`'s per-image function (LR tags, `test_seesr.py`'s prompt, t=999, the run's seed)",
        "a preview shows what inference will produce",
        "`--validation_image`, `--validation_num_inference_steps`, `--validation_guidance_scale`",
    ),
    Difference(
        "small or light training images",
        "`RealESRGANDataset` silently swaps images under 384 x 384 px or 100 KB for random other images",
        "every image is used; one smaller than the crop is mirrored at the bottom and right as SeeSR pads it",
        "the data set is the folder the user gave",
    ),
    Difference(
        "pairing of GT, LR and tag files",
        "`train_seesr.py`'s dataset and `DAPEDataset` zip unsorted directory listings",
        "files are paired by name",
        "an unsorted listing pairs the wrong files on some file systems",
        "`--root_folders`",
    ),
    Difference(
        "`make_tags.py` output path",
        "`tag_path + name` has no separator: it writes `<root>/tag<name>.txt`, which its dataset never reads",
        "`<root>/tag/<name>.txt`, the path the dataset reads",
        "the tags are used",
    ),
)

COLUMNS = ("topic", "SeeSR", "here", "why", "flag")


def _cell(text: str) -> str:
    return text.replace("|", "\\|") or "—"


def differences_markdown(rows: tuple[Difference, ...] = SEESR_DIFFERENCES) -> str:
    """The table as Markdown (one line per row, ``|`` escaped), as ``docs/seesr.md`` holds it."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = (row.topic, row.seesr, row.ours, row.why, row.flag)
        lines.append("| " + " | ".join(_cell(cell) for cell in cells) + " |")
    return "\n".join(lines)
