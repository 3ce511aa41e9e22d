"""The DDPM UNet per resolution, as diffusers ``UNet2DModel`` configurations.

Ho, Jain and Abbeel, "Denoising Diffusion Probabilistic Models" (NeurIPS 2020), code
github.com/hojonathanho/diffusion; the released weights are diffusers' ``google/ddpm-cifar10-32`` and
``google/ddpm-{church,bedroom,cat,celebahq}-256``, whose configurations the 32 and 256 px presets follow.

=========== ============================ ======================= ============= ======== ===========
preset      channels per level           attention at            res blocks    dropout  parameters
=========== ============================ ======================= ============= ======== ===========
32          128, 256, 256, 256           16 px                   2             0.1      35.7M (paper)
64          128, 256, 384, 512           16, 8 px                2             0.1      ~88M
(96)        as 64                        24, 12 px               2             0.1      ~88M (STL-10's size)
128         128, 128, 256, 384, 512      16, 8 px                2             0.0      ~91M
256         128, 128, 256, 256, 512, 512 16 px                   2             0.0      ~114M (paper)
tiny        32, 64                       8 px (lowest level)     1             0.0      tests, demo
=========== ============================ ======================= ============= ======== ===========

64 and 128 px have no DDPM-paper model; they follow Improved DDPM / ADM (Nichol & Dhariwal 2021): channel
multipliers 1,2,3,4 (64 px) and 1,1,2,3,4 (128 px), attention at 16 and 8 px. Dropout 0.1 regularises the
small-data regime (CIFAR-sized sets), as in the paper; the 128/256 px presets use none, as the paper's LSUN models.
96 px (STL-10's native size) has no network of its own: it uses the 64 px one, whose four levels take 96 px down to
12 px (attention at 24 and 12 px), so ``preset_for_size(96)`` is ``"64"``.

Attention uses PyTorch's ``scaled_dot_product_attention`` (diffusers' ``AttnProcessor2_0``). DDPM's
attention is single-headed: ``attention_head_dim=None`` gives one head as wide as the block.
"""

from __future__ import annotations

from diffusers import UNet2DModel

from utils.errors import UserError
from utils.registry import Registry

# The registry's keys are ``--model``'s choices and the ``model_preset`` recorded in every checkpoint. Each entry is a
# preset: channels per level, which levels attend, residual blocks per level, dropout, GroupNorm groups (32 unless
# given) and the learning rate. Learning rates follow the papers: 2e-4 for CIFAR-10 (DDPM), 1e-4 for 64/128 px
# (iDDPM), 2e-5 at 256 px (DDPM LSUN).
UNET_PRESETS: Registry[dict] = Registry("UNet preset", flag="--model")
UNET_PRESETS.register("tiny", dict(channels=(32, 64), attention=(False, True), layers=1, dropout=0.0, groups=8, lr=1e-3),
                      help="0.7M parameters, for tests and the demo")
UNET_PRESETS.register("32", dict(channels=(128, 256, 256, 256), attention=(False, True, False, False), layers=2, dropout=0.1,
                                 lr=2e-4), help="DDPM's CIFAR-10 network, 35.7M")
UNET_PRESETS.register("64", dict(channels=(128, 256, 384, 512), attention=(False, False, True, True), layers=2, dropout=0.1,
                                 lr=1e-4), help="iDDPM/ADM multipliers 1,2,3,4")
UNET_PRESETS.register("128", dict(channels=(128, 128, 256, 384, 512), attention=(False, False, False, True, True), layers=2,
                                  dropout=0.0, lr=1e-4), help="iDDPM/ADM multipliers 1,1,2,3,4")
UNET_PRESETS.register("256", dict(channels=(128, 128, 256, 256, 512, 512), attention=(False, False, False, False, True, False),
                                  layers=2, dropout=0.0, lr=2e-5), help="DDPM's LSUN network, 6 levels")
# Image size -> preset: the paper-sized network, and for STL-10's 96 px the 64 px network (no paper model at 96 px).
SIZE_PRESETS = {32: "32", 64: "64", 96: "64", 128: "128", 256: "256"}
SUPPORTED_SIZES = tuple(SIZE_PRESETS)


def preset_for_size(size: int) -> str:
    """The preset used at ``--size``: the paper-sized network for 32/64/128/256 px, the 64 px one at 96 px."""
    if size not in SIZE_PRESETS:
        raise UserError(f"--size {size} has no UNet preset; choose one of {', '.join(map(str, SUPPORTED_SIZES))} (or --model tiny).")
    return SIZE_PRESETS[size]


def ddpm_unet_config(preset: str, sample_size: int) -> dict:
    """The ``UNet2DModel`` keyword arguments of ``preset`` for images of ``sample_size`` px."""
    spec = UNET_PRESETS.get(preset)
    levels = len(spec["channels"])
    if sample_size % 2 ** (levels - 1):
        raise UserError(f"The '{preset}' UNet halves the image {levels - 1} times; --size {sample_size} must be a multiple "
                        f"of {2 ** (levels - 1)}.")
    down = tuple("AttnDownBlock2D" if attn else "DownBlock2D" for attn in spec["attention"])
    up = tuple("AttnUpBlock2D" if attn else "UpBlock2D" for attn in reversed(spec["attention"]))
    return dict(
        sample_size=sample_size,
        in_channels=3,
        out_channels=3,
        layers_per_block=spec["layers"],
        block_out_channels=spec["channels"],
        down_block_types=down,
        up_block_types=up,
        dropout=spec["dropout"],
        norm_num_groups=spec.get("groups", 32),
        norm_eps=1e-6,
        attention_head_dim=None,  # one head, as DDPM
        # The sinusoidal embedding of the original TF code (what google/ddpm-* checkpoints use).
        flip_sin_to_cos=False,
        freq_shift=1,
        downsample_padding=0,
        resnet_time_scale_shift="default",
        time_embedding_type="positional",
        act_fn="silu",
    )


def build_ddpm_unet(preset: str, sample_size: int, dropout: float | None = None) -> UNet2DModel:
    """A new UNet of ``preset`` for ``sample_size`` px images; ``dropout`` overrides the preset's."""
    config = ddpm_unet_config(preset, sample_size)
    if dropout is not None:
        config["dropout"] = dropout
    return UNet2DModel(**config)


def default_learning_rate(preset: str) -> float:
    return UNET_PRESETS.get(preset)["lr"]
