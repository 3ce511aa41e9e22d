"""The users' latent-UNet note on files in their own layout: ``infer.py user`` runs its command flag for flag.

The test writes what the note's training leaves behind (tiny and random, same formats): a diffusers
``UNet2DConditionModel`` folder, ``condition_encoder.pt`` as a state dict of ``nn.Embedding(num_users, D)`` (no null
row: trained without label dropout) and a diffusers ``AutoencoderKL`` folder whose ``scaling_factor`` (0.5 here, not
1, so that forgetting it shows) scaled the training latents. :func:`note_generate_samples` is the note's
training-time sampler written out independently from diffusers' public API (``bench.bench_latent_unet_vs_note``'s
``note_ddim_loop``: DDIMScheduler.from_config of the DDPM config, one cross-attention token per user; then
``latents / scaling_factor`` before decoding); the CLI must compute the same latents and pixels.
"""

import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from PIL import Image

import infer
from bench.bench_latent_unet_vs_note import note_ddim_loop
from models.user_generation import build_noise_scheduler, initial_noise
from models.user_unet import user_unet_config
from utils.errors import UserError

SCALING = 0.5
NOTE_FLAGS = ["--num_users", "31", "--user_ids", "1", "5", "10", "15", "--num_images_per_user", "5",
              "--num_inference_steps", "20", "--device", "auto", "--seed", "42"]


@pytest.fixture(scope="module")
def note_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("kaggle_input")
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(16, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8, sample_size=16,
                        scaling_factor=SCALING)
    vae.save_pretrained(root / "final-model")
    unet = UNet2DConditionModel(**user_unet_config("tiny", in_channels=4, sample_size=8))
    with torch.no_grad():  # diffusers zero-initialises the output conv; a random one makes every step count
        unet.conv_out.weight.normal_(0, 0.05)
    unet.save_pretrained(root / "diffusion-final-model")
    table = torch.randn(31, 32, generator=torch.Generator().manual_seed(1))  # nn.Embedding(31, 32): no null row
    torch.save({"embedding.weight": table}, root / "diffusion-final-model/condition_encoder.pt")
    return {"root": root, "vae": root / "final-model", "unet": root / "diffusion-final-model", "table": table}


def note_command(files, output, *extra):
    return ["user", "--vae_path", str(files["vae"]), "--unet_path", str(files["unet"]), "--condition_encoder_path",
            str(files["unet"] / "condition_encoder.pt"), *NOTE_FLAGS, "--output_dir", str(output), *extra]


@torch.no_grad()
def note_generate_samples(files, users, per_user, steps, seed=42, guidance=1.0, table=None, spacing="leading"):
    """The note's ``generate_samples``: DDIM from the DDPM config, token = table[user - 1], decode latents / scaling."""
    unet = UNet2DConditionModel.from_pretrained(files["unet"]).eval()
    vae = AutoencoderKL.from_pretrained(files["vae"]).eval()
    table = files["table"] if table is None else table
    pairs = [(user, index) for user in users for index in range(per_user)]
    latents, _ = initial_noise(seed, [u for u, _ in pairs], [i for _, i in pairs], (4, 8, 8))  # the CLI's per-sample noise
    latents = note_ddim_loop(unet, table, build_noise_scheduler().config, latents, [u for u, _ in pairs], steps, guidance,
                             spacing)
    latents = latents / vae.config.scaling_factor
    return latents, vae.decode(latents).sample.clamp(-1, 1)


def to_uint8(image):
    return ((image.permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)


def test_the_notes_command_runs_flag_for_flag(note_files, tmp_path):
    result = infer.main(infer.parse_args(note_command(note_files, tmp_path / "generated_images")))
    out = tmp_path / "generated_images"
    assert sorted(p.relative_to(out).as_posix() for p in out.glob("user_*/*.png")) == [
        f"user_{u:02d}/generated_{i:03d}.png" for u in (1, 5, 10, 15) for i in range(5)]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sampling"]["guidance_scale"] == 1.0 and manifest["sampling"]["timestep_spacing"] == "trailing"
    assert manifest["model"]["weights"] == "folder" and result["latents"].shape == (20, 4, 8, 8)
    # trailing (the default) and the note's leading spacing are different samplers: a different first step t=999 vs 950
    leading = infer.main(infer.parse_args(note_command(note_files, tmp_path / "leading", "--timestep_spacing", "leading")))
    assert (result["latents"] - leading["latents"]).abs().max() > 1e-2


def test_reproduces_the_notes_generate_samples(note_files, tmp_path):
    """Same weights, same noise: the CLI with --timestep_spacing leading is the note's sampler to float rounding."""
    result = infer.main(infer.parse_args(note_command(note_files, tmp_path / "out", "--timestep_spacing", "leading")))
    latents, images = note_generate_samples(note_files, [1, 5, 10, 15], 5, 20)
    # Measured max difference 0 at 1 and 2 threads (one batch of 20 through the same ops); rtol 1e-4 leaves room for
    # another BLAS order. The random UNet's latents reach a few hundred, so forgetting the scale is far outside it.
    torch.testing.assert_close(result["latents"], latents, atol=1e-4, rtol=1e-4)
    written = np.asarray(Image.open(tmp_path / "out/user_10/generated_003.png"))
    expected = to_uint8(images[2 * 5 + 3])
    assert np.abs(written.astype(int) - expected.astype(int)).max() <= 1  # rounding to uint8 of equal values
    # Forgetting the VAE's scaling factor would be a factor 2 on every latent: far outside the tolerance above.
    assert (result["latents"] - latents * SCALING).abs().max() > 1e-2


def test_a_table_with_a_null_row_guides(note_files, tmp_path):
    """num_users + 1 rows: the last is the null user and --guidance_scale works; the note's sampler with CFG agrees."""
    folder = tmp_path / "with-null"
    UNet2DConditionModel.from_pretrained(note_files["unet"]).save_pretrained(folder)
    table = torch.cat([note_files["table"], torch.randn(1, 32, generator=torch.Generator().manual_seed(2))])
    torch.save({"embedding.weight": table}, folder / "condition_encoder.pt")
    result = infer.main(infer.parse_args([
        "user", "--vae_path", str(note_files["vae"]), "--unet_path", str(folder), "--num_users", "31", "--user_ids", "2",
        "--num_images_per_user", "2", "--num_inference_steps", "5", "--guidance_scale", "3", "--timestep_spacing", "leading",
        "--device", "cpu", "--seed", "42", "--output_dir", str(tmp_path / "out"),
    ]))
    latents, _ = note_generate_samples(note_files, [2], 2, 5, guidance=3.0, table=table)
    torch.testing.assert_close(result["latents"], latents, atol=1e-4, rtol=1e-4)


def test_the_users_files_fail_in_one_line(note_files, tmp_path, capsys):
    out = str(tmp_path / "out")
    with pytest.raises(UserError, match=r"--guidance_scale 4: this model has no null user .* drop --guidance_scale"):
        infer.main(infer.parse_args(note_command(note_files, out, "--guidance_scale", "4")))
    flags = note_command(note_files, out)
    # 31 rows read as 30 users + a null row is allowed (our own tables), and the log says so in as many words.
    flags[flags.index("--num_users") + 1] = "30"
    infer.main(infer.parse_args(flags + ["--user_ids", "30", "--num_images_per_user", "1", "--num_inference_steps", "1"]))
    assert "31 rows = users 1..30 + a null row (row 31)" in capsys.readouterr().out
    flags[flags.index("--num_users") + 1] = "12"
    with pytest.raises(UserError, match=r"has 31 rows, but --num_users 12 needs 12 .* \(31 when every row is a user\)"):
        infer.main(infer.parse_args(flags))
    with pytest.raises(UserError, match=r"--user_ids 40|outside the valid range 1..31"):
        infer.main(infer.parse_args(note_command(note_files, out) + ["--user_ids", "40"]))
    vavae_file = tmp_path / "vavae.pt"
    torch.save({}, vavae_file)
    flags = note_command(note_files, out)
    flags[flags.index("--vae_path") + 1] = str(vavae_file)
    with pytest.raises(UserError, match="records no scaling factor.*pass --latent_stats.*or --scaling_factor"):
        infer.main(infer.parse_args(flags))
