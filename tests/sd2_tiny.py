"""A tiny random Stable-Diffusion-2-layout diffusers folder, built offline in a second, for tests.

Same layout and block structure as ``stabilityai/stable-diffusion-2-base`` -- ``unet/`` (4 down blocks, 3 with
cross-attention, 2 layers each, linear projections: the ControlNet made from it returns 12 down residuals in
4 resolution levels + mid), ``vae/`` (4 levels: 8x downsampling), ``text_encoder/`` (CLIPTextModel),
``tokenizer/`` (a byte-level CLIP BPE vocabulary of the 256 byte symbols, written here, no download) and
``scheduler/`` (SD2-base's scheduler config verbatim: scaled-linear betas 0.00085..0.012, "leading" spacing,
``steps_offset`` 1, epsilon prediction) -- with tiny channel counts and random weights.

    from tests.sd2_tiny import build_tiny_sd2
    path = build_tiny_sd2(tmp_path / "sd2")   # -> Path of the folder
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_LATENT_CHANNELS = 4
TINY_TEXT_DIM = 32

# stabilityai/stable-diffusion-2-base scheduler/scheduler_config.json (a PNDM config; SeeSR and this repository
# read it with DDPMScheduler, whose defaults fill the rest: "leading" spacing, fixed_small variance).
SD2_BASE_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.8.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}

# stabilityai/sd-turbo scheduler/scheduler_config.json: the base folder of SeeSR-Turbo (test_seesr_turbo.py), read with
# DDPMScheduler as SeeSR does; its "trailing" spacing makes 2 steps visit t = 999, 499.
SD_TURBO_SCHEDULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.24.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "sigma_max": None,
    "sigma_min": None,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "trailing",
    "timestep_type": "discrete",
    "trained_betas": None,
    "use_karras_sigmas": False,
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(code) for code in codes)))


def write_tiny_clip_tokenizer(folder: Path, model_max_length: int = 77) -> int:
    """Write vocab.json, merges.txt and tokenizer_config.json of a byte-level CLIP BPE; returns the vocab size."""
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(_bytes_to_unicode().values())
    vocab = {}
    for symbol in symbols + [symbol + "</w>" for symbol in symbols]:
        vocab[symbol] = len(vocab)
    # A handful of merges so the BPE is not degenerate (CLIP marks a word's last symbol with "</w>").
    merges = ["t h", "i n", "e r", "a n", "o n", "r e", "th e</w>", "in g</w>"]
    for merge in merges:
        vocab.setdefault(merge.replace(" ", ""), len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": model_max_length,
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "do_lower_case": True,
            }
        )
    )
    return len(vocab)


def build_tiny_sd2(
    path: str | Path, seed: int = 0, block_channels=(8, 16, 16, 16), light_attention: bool = False,
    scheduler_config: dict | None = None,
) -> Path:
    """Write a tiny SD2-layout diffusers folder at ``path`` (created) and return it.

    ``scheduler_config``: default SD2-base's; :data:`SD_TURBO_SCHEDULER_CONFIG` (with another ``seed``) makes a tiny
    sd-turbo folder.

    ``light_attention=True`` drops the transformer of the first (full latent resolution) level and uses one
    attention head per block: self-attention over every latent pixel dominates CPU time at SeeSR's 512 px process
    size. The residual layout (12 down residuals in 4 levels + mid) is unchanged, and 50 sampling steps at 512 px
    take seconds instead of minutes.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)

    first_down = "DownBlock2D" if light_attention else "CrossAttnDownBlock2D"
    last_up = "UpBlock2D" if light_attention else "CrossAttnUpBlock2D"
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=TINY_LATENT_CHANNELS,
        out_channels=TINY_LATENT_CHANNELS,
        down_block_types=(first_down, "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", last_up),
        block_out_channels=tuple(block_channels),
        layers_per_block=2,
        norm_num_groups=4,
        cross_attention_dim=TINY_TEXT_DIM,
        attention_head_dim=(1, 1, 1, 1) if light_attention else (2, 4, 4, 4),  # diffusers: the number of heads
        use_linear_projection=True,
    )
    unet.save_pretrained(path / "unet")

    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=TINY_LATENT_CHANNELS,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=0.18215,
    )
    vae.save_pretrained(path / "vae")

    vocab_size = write_tiny_clip_tokenizer(path / "tokenizer")
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=TINY_TEXT_DIM,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=TINY_TEXT_DIM,
            hidden_act="gelu",
            bos_token_id=vocab_size - 2,
            eos_token_id=vocab_size - 1,
            pad_token_id=vocab_size - 1,
        )
    )
    text_encoder.save_pretrained(path / "text_encoder")

    (path / "scheduler").mkdir(exist_ok=True)
    (path / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config or SD2_BASE_SCHEDULER_CONFIG, indent=2))
    (path / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusionPipeline",
                "scheduler": ["diffusers", "PNDMScheduler"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
            },
            indent=2,
        )
    )
    return path
