"""SeeSR-Turbo (cswry/SeeSR ``test_seesr_turbo.py``) through ``infer.py seesr``, on tiny weights.

SeeSR-Turbo builds its UNet with ``UNet2DConditionModel.from_pretrained_orig(sd_turbo, seesr, subfolder="unet",
use_image_cross_attention=True)``: the config of the base folder's UNet with image attention switched on, the base
folder's weights, and only the ``image_attentions`` tensors of SeeSR's ``unet/`` (merged, ``strict=False``). The
tests write that computation out and compare it with ours (state dicts and outputs), then run the README's turbo
command line as written on a tiny release layout (sd-turbo's scheduler config verbatim, SeeSR's folders, RAM + DAPE).
"""

import json
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from PIL import Image
from safetensors.torch import load_file

import infer
from models.seesr import SeeSRPipeline, build_controlnet, graft_image_attentions, is_turbo_base
from models.seesr_unet import IMAGE_ATTENTIONS, SeeSRUNet2DConditionModel, unet_with_image_attention
from pipelines.seesr import resolve_settings
from tests.ram_tiny import TINY_RAM_CONFIG, write_tiny_ram
from tests.sd2_tiny import SD_TURBO_SCHEDULER_CONFIG, build_tiny_sd2
from utils.errors import CheckpointError, run_cli

TURBO_README = """seesr --pretrained_model_path preset/models/sd-turbo --prompt '' --seesr_model_path preset/models/seesr
    --ram_ft_path preset/models/DAPE.pth --image_path preset/datasets/test_datasets --output_dir preset/datasets/output
    --start_point lr --num_inference_steps 2 --guidance_scale 1.0 --process_size 512"""


def perturbed(model, seed, std=0.3):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(std * torch.randn(parameter.shape, generator=generator))
    return model


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    """preset/models/{stable-diffusion-2-base, sd-turbo, seesr/{unet,controlnet}, RAM + DAPE} and one LR image.

    SeeSR's UNet is SD2-base's with trained image attentions (all its weights perturbed, so that taking anything but
    the image attentions from it would show); sd-turbo is another tiny SD2-layout UNet (another seed)."""
    root = tmp_path_factory.mktemp("turbo")
    models = root / "preset/models"
    sd2 = build_tiny_sd2(models / "stable-diffusion-2-base", light_attention=True)
    turbo = build_tiny_sd2(models / "sd-turbo", seed=1, light_attention=True, scheduler_config=SD_TURBO_SCHEDULER_CONFIG)
    ram = write_tiny_ram(models)
    torch.manual_seed(0)
    unet = unet_with_image_attention(UNet2DConditionModel.from_pretrained(sd2, subfolder="unet"),
                                     TINY_RAM_CONFIG.embed_width)
    perturbed(unet, seed=2)
    controlnet = build_controlnet(unet)
    perturbed(controlnet, seed=3)
    # test_seesr_turbo.py reads the UNet's safetensors (from_pretrained_orig); the ControlNet as diffusers does.
    unet.save_pretrained(models / "seesr/unet", safe_serialization=True)
    controlnet.save_pretrained(models / "seesr/controlnet", safe_serialization=False)
    images = root / "preset/datasets/test_datasets"
    images.mkdir(parents=True)
    generator = torch.Generator().manual_seed(4)
    pixels = (torch.rand(12, 10, 3, generator=generator) * 255).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(images / "frog.png")
    return {"root": root, "sd2": sd2, "turbo": turbo, "seesr": models / "seesr", "ram": ram, "images": images}


@pytest.fixture()
def tiny_ram(monkeypatch):
    """RAM's architecture is not in its weight file: load_ram_tagger's default (Swin-L) becomes the tiny one."""
    import models.ram

    monkeypatch.setattr(models.ram, "RAM_SWIN_L", TINY_RAM_CONFIG)


def seesr_from_pretrained_orig(pretrained_model_path: Path, seesr_model_path: Path) -> SeeSRUNet2DConditionModel:
    """SeeSR's ``UNet2DConditionModel.from_pretrained_orig(..., subfolder="unet", use_image_cross_attention=True)``,
    step by step. SeeSR's blocks fix the image width at RAM's 512; the tiny release's width comes from its config."""
    base, seesr = pretrained_model_path / "unet", seesr_model_path / "unet"
    config = json.loads((base / "config.json").read_text())
    config["use_image_cross_attention"] = True
    config["image_cross_attention_dim"] = json.loads((seesr / "config.json").read_text())["image_cross_attention_dim"]
    model = SeeSRUNet2DConditionModel.from_config(config)
    state_dict = load_file(base / "diffusion_pytorch_model.safetensors", device="cpu")
    state_dict_seesr = load_file(seesr / "diffusion_pytorch_model.safetensors", device="cpu")
    for key, value in state_dict_seesr.items():
        if "image_attentions" in key:
            state_dict.update({key: value})
    model.load_state_dict(state_dict, strict=False)
    return model.eval()


def unet_inputs(seed=0, batch=2):
    generator = torch.Generator().manual_seed(seed)
    return dict(
        sample=torch.randn(batch, 4, 8, 8, generator=generator),
        timestep=torch.tensor([999, 499][:batch]),
        encoder_hidden_states=torch.randn(batch, 77, 32, generator=generator),
        image_encoder_hidden_states=torch.randn(batch, 145, TINY_RAM_CONFIG.embed_width, generator=generator),
    )


def test_grafted_unet_equals_seesr_from_pretrained_orig(layout):
    base = UNet2DConditionModel.from_pretrained(layout["turbo"], subfolder="unet")
    ours = graft_image_attentions(base, layout["seesr"] / "unet")
    reference = seesr_from_pretrained_orig(layout["turbo"], layout["seesr"])
    ours_state, reference_state = ours.state_dict(), reference.state_dict()
    assert list(ours_state) == list(reference_state)
    assert all(torch.equal(ours_state[key], reference_state[key]) for key in reference_state)
    # The point of the graft: sd-turbo's weights everywhere but the image attentions, which are SeeSR's.
    seesr = load_file(layout["seesr"] / "unet/diffusion_pytorch_model.safetensors")
    assert torch.equal(ours_state["conv_in.weight"], base.state_dict()["conv_in.weight"])
    assert not torch.equal(ours_state["conv_in.weight"], seesr["conv_in.weight"])
    image_keys = [key for key in ours_state if IMAGE_ATTENTIONS in key]
    assert image_keys and all(torch.equal(ours_state[key], seesr[key]) for key in image_keys)
    with torch.no_grad():
        assert torch.equal(ours(**unet_inputs()).sample, reference(**unet_inputs()).sample)
    assert is_turbo_base(layout["turbo"]) and not is_turbo_base(layout["sd2"])


def test_readme_turbo_command_runs_as_written(layout, tiny_ram, monkeypatch, capsys):
    """SeeSR's README command for test_seesr_turbo.py, word for word, with infer.py seesr for the script."""
    import models.seesr

    monkeypatch.chdir(layout["root"])
    calls = []
    predict_noise = models.seesr.predict_noise
    monkeypatch.setattr(models.seesr, "predict_noise",
                        lambda *a, **k: calls.append((int(a[4]), a[3].shape[0])) or predict_noise(*a, **k))
    result = infer.main(infer.parse_args(TURBO_README.split()))
    out = capsys.readouterr().out
    assert ("UNet: preset/models/sd-turbo/unet with the checkpoint's image attentions (SeeSR-Turbo, as "
            "test_seesr_turbo.py: the base folder is a turbo model, its scheduler uses trailing timestep spacing)") in out
    assert result["turbo"] and calls == [(999, 1), (499, 1)]  # trailing spacing, no guidance batch
    [output] = result["written"]
    assert output == Path("preset/datasets/output/sample00/frog.png") and Image.open(output).size == (40, 48)


def test_turbo_pipeline_unet_is_the_grafted_one(layout):
    pipeline, messages = SeeSRPipeline.from_pretrained(layout["turbo"], layout["seesr"])
    assert messages[-1].startswith(f"UNet: {layout['turbo'] / 'unet'} with the checkpoint's image attentions")
    expected = seesr_from_pretrained_orig(layout["turbo"], layout["seesr"]).state_dict()
    state = pipeline.unet.state_dict()
    assert all(torch.equal(state[key], expected[key]) for key in expected) and set(state) == set(expected)
    plain, messages = SeeSRPipeline.from_pretrained(layout["sd2"], layout["seesr"])  # test_seesr.py: SeeSR's own UNet
    seesr = load_file(layout["seesr"] / "unet/diffusion_pytorch_model.safetensors")
    assert all(torch.equal(plain.unet.state_dict()[key], value) for key, value in seesr.items())
    assert messages[-1].endswith("(the checkpoint's, as test_seesr.py: the base folder is not a turbo model)")


@pytest.mark.parametrize("base, given, expected", [
    ("turbo", [], (2, 1.0, 32)),  # test_seesr_turbo.py's defaults
    ("sd2", [], (50, 5.5, 4)),  # test_seesr.py's
    ("turbo", ["--steps", "4", "--guidance_scale", "2", "--latent_tiled_overlap", "8"], (4, 2.0, 8)),
])
def test_defaults_follow_the_base_folder(layout, base, given, expected):
    args = infer.parse_args(["seesr", "--pretrained_model_path", str(layout[base]), "--seesr_model_path",
                             str(layout["seesr"]), "--image_path", str(layout["images"]), *given])
    settings = resolve_settings(args)
    assert (settings.num_inference_steps, settings.guidance_scale, settings.latent_tiled_overlap) == expected
    assert settings.turbo == (base == "turbo") and args.num_inference_steps is (None if not given else 4)


def test_combinations_that_cannot_be_right_are_one_line(layout, tmp_path, capsys):
    wide = build_tiny_sd2(tmp_path / "sd-turbo-wide", block_channels=(8, 16, 16, 32), light_attention=True,
                          scheduler_config=SD_TURBO_SCHEDULER_CONFIG)
    plain_release = tmp_path / "plain"
    torch.manual_seed(0)
    text_only = UNet2DConditionModel.from_pretrained(layout["sd2"], subfolder="unet")
    text_only.save_pretrained(plain_release / "unet")
    build_controlnet(text_only).save_pretrained(plain_release / "controlnet")
    cases = [
        ([str(layout["sd2"]), str(layout["seesr"]), "--num_inference_steps", "2"],
         f"--num_inference_steps 2 is SeeSR-Turbo's regime, but --pretrained_model_path {layout['sd2']} is not a turbo"),
        ([str(layout["sd2"]), str(layout["seesr"]), "--num_inference_steps", "4"], "needs more than 4 steps"),
        ([str(wide), str(layout["seesr"])], f"The image attentions in {layout['seesr'] / 'unet'} do not fit the UNet of "
         "--pretrained_model_path: 26 image-attention weights of another shape"),
        ([str(layout["turbo"]), str(plain_release)], "holds a UNet without image attention"),
    ]
    for (base, seesr, *flags), fragment in cases:
        argv = ["seesr", "--pretrained_model_path", base, "--seesr_model_path", seesr, "--image_path",
                str(layout["images"]), "--output_dir", str(tmp_path / "out"), "--device", "cpu", *flags]
        with pytest.raises(SystemExit) as exit_info:
            run_cli(lambda argv=argv: infer.main(infer.parse_args(argv)))
        error = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(error) == 1 and error[0].startswith("error: "), (flags, error)
        assert fragment in error[0], (fragment, error[0])
    assert not (tmp_path / "out").exists()
    with pytest.raises(CheckpointError, match="do not fit the UNet of sd-turbo-wide"):
        graft_image_attentions(UNet2DConditionModel.from_pretrained(wide, subfolder="unet"), layout["seesr"] / "unet",
                               base_name="sd-turbo-wide")
