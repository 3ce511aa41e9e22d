"""app.py through its HTTP API (gradio_client), one app per module on a free loopback port with every tab's tiny model.

Each tab's picture must equal the file infer.py writes for the same weights, seed and settings; every bad upload is one
sentence in the answer and the next request succeeds; the server listens on loopback only, serves no file outside its
output folder, and runs one job at a time per model from a bounded queue.
"""

from __future__ import annotations

import csv
import importlib.util
import os

import numpy as np
import pytest

# find_spec, not importorskip: importing gradio costs seconds in every xdist worker's collection; the tests import it.
if importlib.util.find_spec("gradio") is None or importlib.util.find_spec("gradio_client") is None:
    pytest.skip("the app's extras are not installed (pip install -r requirements-app.txt)", allow_module_level=True)

import app  # noqa: E402
import infer  # noqa: E402
from tests.app_models import app_argv, assert_same_picture, build_models, pixels, start_app, use_tiny_ram, write_uploads  # noqa: E402
from utils.errors import UserError  # noqa: E402


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    models = build_models(tmp_path_factory.getbasetemp() / "app_models")
    uploads = write_uploads(tmp_path_factory.mktemp("uploads"))
    output_dir = tmp_path_factory.mktemp("app_output")
    tiny_ram = use_tiny_ram()
    demo, url = start_app(app_argv(models, output_dir))
    from gradio_client import Client

    client = Client(url, verbose=False, download_files=str(tmp_path_factory.mktemp("downloads")))
    yield {"demo": demo, "url": url, "client": client, "models": models, "uploads": uploads, "output_dir": output_dir}
    demo.close()
    tiny_ram.undo()


def call(served, api_name: str, *inputs):
    return served["client"].predict(*inputs, api_name=api_name)


def upload(path):
    from gradio_client import handle_file

    return handle_file(str(path))


def app_error(served, api_name: str, *inputs) -> str:
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as error:
        call(served, api_name, *inputs)
    return str(error.value)


# ---------------------------------------------------------------------------------------------- infer.py equality

def test_ddpm_grid_and_strip_equal_infer_files(served, tmp_path):
    path = str(served["models"]["ddpm"])
    grid = call(served, "/ddpm_sample", path, "ddim", 4, 3, 5)
    strip = call(served, "/ddpm_interpolate", path, "ddpm", 3, 7, 4)
    common = ["ddpm", "--model", path, "--device", "cpu", "--output_dir", str(tmp_path)]
    infer.main(infer.parse_args([*common, "--sampler", "ddim", "--num_inference_steps", "4", "--seed", "3", "--num_samples", "5"]))
    infer.main(infer.parse_args([*common, "--sampler", "ddpm", "--num_inference_steps", "3", "--seed", "7", "--interpolate",
                                 "--frames", "4"]))
    assert_same_picture(grid, tmp_path / "ddpm_samples.png")
    assert_same_picture(strip, tmp_path / "ddpm_interpolation.png")


def test_phaseformer_outputs_and_scores_equal_infer_files(served, tmp_path):
    uploads = served["uploads"]
    slider, low, high, scores = call(served, "/phaseformer_enhance", upload(uploads["rgb"]), upload(uploads["reference"]))
    (tmp_path / "in").mkdir()
    (tmp_path / "gt").mkdir()
    (tmp_path / "in/photo.png").write_bytes(uploads["rgb"].read_bytes())
    (tmp_path / "gt/photo.png").write_bytes(uploads["reference"].read_bytes())
    infer.main(infer.parse_args(["phaseformer", "--checkpoint", str(served["models"]["phaseformer"]), "--input",
                                 str(tmp_path / "in"), "--gt_dir", str(tmp_path / "gt"), "--output_dir", str(tmp_path / "out"),
                                 "--underwater_metrics", "--device", "cpu"]))
    assert_same_picture(low, tmp_path / "out/L/photo.png")
    assert_same_picture(high, tmp_path / "out/H/photo.png")
    before, after = slider
    assert np.array_equal(pixels(before), pixels(uploads["rgb"])) and np.array_equal(pixels(after), pixels(low))
    row = next(csv.DictReader(open(tmp_path / "out/metrics.csv")))
    for key, label in (("uiqm", "UIQM"), ("uciqe", "UCIQE")):
        assert f"| {label} | {float(row[key + '_input']):.4f} | {float(row[key]):.4f} |" in scores
    assert f"| PSNR (dB) | | {float(row['psnr']):.4f} |" in scores and f"| SSIM | | {float(row['ssim']):.4f} |" in scores


def test_user_samples_equal_infer_files_with_the_classifier_prediction(served, tmp_path):
    gallery = call(served, "/user_generate", "1, 3", 2, 2.5, 3, 5)
    infer.main(infer.parse_args(["user", "--dit_checkpoint", str(served["models"]["dit"]), "--vavae_path",
                                 str(served["models"]["vavae"]), "--vavae_config", "tiny", "--user_ids", "1", "3",
                                 "--num_samples_per_user", "2", "--guidance_scale", "2.5", "--num_inference_steps", "3",
                                 "--seed", "5", "--output_dir", str(tmp_path), "--device", "cpu"]))
    expected = [(1, 0), (1, 1), (3, 0), (3, 1)]
    assert len(gallery) == len(expected)
    for entry, (user, index) in zip(gallery, expected, strict=True):
        assert_same_picture(entry["image"], tmp_path / f"user_{user:02d}/generated_{index:03d}.png")
        assert entry["caption"].startswith(f"user {user} #{index:03d}: classifier says user ")
    assert "more than once" in app_error(served, "/user_generate", "1 1", 1, 2.5, 3, 5)
    assert "outside the valid range 1..3" in app_error(served, "/user_generate", "9", 1, 2.5, 3, 5)


def seesr_file(served, tmp_path, base: str, checkpoint: str, *flags: str):
    """The file infer.py seesr writes for the tests' LR image (seed 3) with ``flags``."""
    models = served["models"]
    output = tmp_path / f"{checkpoint}_{base}"
    infer.main(infer.parse_args(["seesr", "--pretrained_model_path", str(models[base]), "--seesr_model_path", str(models[checkpoint]),
                                 "--image_path", str(served["uploads"]["lr"]), "--output_dir", str(output), "--ram_path",
                                 str(models["ram"]), "--ram_ft_path", str(models["dape"]), "--process_size", "64", "--seed", "3",
                                 "--device", "cpu", *flags]))
    return output / "sample00/frog.png"


def seesr_inputs(served, name, other="none", tags="", steps=5, guidance=5.5):
    return (upload(served["uploads"]["lr"]), name, other, tags, "", "clean, high-resolution, 8k",
            "dotted, noise, blur, lowres, smooth", steps, guidance, 3, "lr", "adain", 4)


def test_seesr_two_checkpoints_side_by_side_equal_infer_files(served, tmp_path):
    slider, first, second, text = call(served, "/seesr_super_resolve", *seesr_inputs(served, "seesr", "seesr_b"))
    assert_same_picture(first, seesr_file(served, tmp_path, "sd2", "seesr", "--num_inference_steps", "5"))
    assert_same_picture(second, seesr_file(served, tmp_path, "sd2", "seesr_b", "--num_inference_steps", "5"))
    assert pixels(first).shape == (64, 80, 3) and not np.array_equal(pixels(first), pixels(second))
    assert [pixels(side).shape for side in slider] == [(64, 80, 3)] * 2
    tags = call(served, "/seesr_tags", upload(served["uploads"]["lr"]), "seesr")
    assert tags == "cat, tree, building"  # the tiny RAM's thresholds fire these on any image
    assert f"**seesr**: `{tags}, ,clean, high-resolution, 8k`" in text  # infer.py's prompt, RAM + DAPE's tags


def test_seesr_turbo_and_edited_tags(served, tmp_path):
    _, turbo, _, _ = call(served, "/seesr_super_resolve", *seesr_inputs(served, "seesr (turbo)", steps=2, guidance=1.0))
    assert_same_picture(turbo, seesr_file(served, tmp_path, "turbo", "seesr", "--num_inference_steps", "2", "--guidance_scale", "1.0"))
    slider, _, _, text = call(served, "/seesr_super_resolve", *seesr_inputs(served, "seesr", tags="a red frog"))
    assert "`a red frog, ,clean, high-resolution, 8k`" in text
    before, _ = slider
    assert pixels(before).shape == (64, 80, 3)  # the LR, enlarged to the output's size for the slider
    assert "Turbo's regime" in app_error(served, "/seesr_super_resolve", *seesr_inputs(served, "seesr", steps=2))


def test_parse_user_ids():
    assert app.parse_user_ids("1 3, 5-7") == [1, 3, 5, 6, 7]
    for text in ("", "a", "1-b"):
        with pytest.raises(UserError):
            app.parse_user_ids(text)


# ------------------------------------------------------------------------------------------------- bad uploads

REFUSED = {
    "text": "is not an image this app can read",
    "truncated": "is damaged or truncated",
    "tiny": "is 1x1 px; upload an image of at least 16 px per side",
    "sixteen_bit": "is a 16-bit or floating-point grayscale image",
    "large": "is 640x480 px, over this app's --max_upload_pixels 100000",
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_a_bad_upload_is_a_message_and_the_next_request_succeeds(served, case):
    message = app_error(served, "/phaseformer_enhance", upload(served["uploads"][case]), None)
    assert REFUSED[case] in message and "Traceback" not in message
    _, low, _, _ = call(served, "/phaseformer_enhance", upload(served["uploads"]["rgb"]), None)
    assert pixels(low).shape == (24, 32, 3)


@pytest.mark.parametrize("case, note", [("rgba", "composited on white"), ("gray", "grayscale: read as RGB")])
def test_rgba_and_grayscale_are_converted_as_infer_reads_them(served, tmp_path, case, note):
    _, low, _, scores = call(served, "/phaseformer_enhance", upload(served["uploads"][case]), None)
    assert note in scores
    infer.main(infer.parse_args(["phaseformer", "--checkpoint", str(served["models"]["phaseformer"]), "--input",
                                 str(served["uploads"][case]), "--output_dir", str(tmp_path), "--device", "cpu"]))
    assert_same_picture(low, tmp_path / "L" / served["uploads"][case].name)


def test_missing_upload_and_mismatched_reference(served):
    assert "Upload underwater image first" in app_error(served, "/phaseformer_enhance", None, None)
    message = app_error(served, "/phaseformer_enhance", upload(served["uploads"]["rgb"]), upload(served["uploads"]["other_size"]))
    assert "The reference is 20x20 px but the image is 32x24 px" in message


def test_bad_settings_are_messages_with_infer_wording(served):
    path = str(served["models"]["ddpm"])
    assert "more than the 1000 timesteps" in app_error(served, "/ddpm_sample", path, "ddim", 5000, 0, 2)
    assert "less than minimum value 1" in app_error(served, "/ddpm_sample", path, "ddim", 0, 0, 2)  # the widget's own bound


# ------------------------------------------------------------------------------------------ serving and safety

def test_serves_loopback_only_and_no_file_outside_its_output_folder(served):
    import httpx

    assert served["url"].startswith("http://127.0.0.1:")
    for outside in (app.__file__, "/etc/passwd", os.path.abspath("infer.py")):
        assert httpx.get(f"{served['url']}/gradio_api/file={outside}").status_code in (403, 404)
    call(served, "/ddpm_sample", str(served["models"]["ddpm"]), "ddim", 2, 0, 1)  # a result of this test's own request
    inside = next((served["output_dir"] / "gradio").rglob("*.png"))
    assert httpx.get(f"{served['url']}/gradio_api/file={inside}").status_code == 200


def test_one_job_per_model_from_a_bounded_queue(served):
    demo = served["demo"]
    assert demo._queue.max_size == 8
    events = [fn for fn in demo.fns.values() if fn.api_name in ("ddpm_sample", "ddpm_interpolate", "phaseformer_enhance",
                                                                  "user_generate", "seesr_tags", "seesr_super_resolve")]
    assert len(events) == 6
    for fn in events:
        assert fn.concurrency_limit == 1 and fn.trigger_mode == "once"
    ids = {fn.api_name: fn.concurrency_id for fn in events}
    assert ids["ddpm_sample"] == ids["ddpm_interpolate"] and ids["seesr_tags"] == ids["seesr_super_resolve"]
    assert len({ids["ddpm_sample"], ids["phaseformer_enhance"], ids["user_generate"], ids["seesr_tags"]}) == 4


def test_flags_and_their_checks(tmp_path, monkeypatch):
    args = app.parse_args([])
    assert (args.host, args.share, args.auth, args.output_dir) == ("127.0.0.1", False, None, "app_output")
    for argv in (["--auth", "nopassword"], ["--auth", ":x"], ["--dit_checkpoint", "a", "--unet_path", "b"], ["--port", "0"],
                 ["--seesr_model_path", "s"], ["--turbo_model_path", "t"]):
        with pytest.raises(SystemExit):
            app.parse_args(argv)
    monkeypatch.chdir(tmp_path)  # no demo_output/ here: every tab names its flag, nothing is loaded
    # build_app points Gradio's cache at its --output_dir through the environment; the module's app must keep its own
    monkeypatch.setenv("GRADIO_TEMP_DIR", os.environ.get("GRADIO_TEMP_DIR", ""))
    demo = app.build_app(app.parse_args(["--output_dir", str(tmp_path / "out")]))
    assert demo.app_tabs == {}
    assert not os.path.exists(os.path.splitext(app.__file__)[0] + ".pyi")  # Gradio writes one beside a component subclass
    page = str(demo.config)
    for flag in ("--model ddpm_best.pt", "scripts/demo.sh", "--checkpoint netG_model_best.pth", "--dit_checkpoint", "--vavae_path",
                 "--pretrained_model_path", "--seesr_model_path"):
        assert flag in page
    write_demo_checkpoint(tmp_path / app.DEMO_CHECKPOINT)  # what scripts/demo.sh leaves: the DDPM tab opens it with no flag
    demo = app.build_app(app.parse_args(["--output_dir", str(tmp_path / "out")]))
    assert list(demo.app_tabs) == ["ddpm"] and demo.app_tabs["ddpm"].paths == [str(app.DEMO_CHECKPOINT)]
    with pytest.raises(UserError, match="--vavae_path"):
        app.build_app(app.parse_args(["--dit_checkpoint", "x.ckpt", "--output_dir", str(tmp_path / "out")]))
    with pytest.raises(UserError, match="--checkpoint missing.pth does not exist"):
        app.build_app(app.parse_args(["--checkpoint", "missing.pth", "--output_dir", str(tmp_path / "out")]))


def write_demo_checkpoint(path):
    """A train_ddpm_highres.py-style checkpoint (kind, UNet config and weights, schedule) of the tiny 16 px UNet."""
    import torch
    from diffusers import DDPMScheduler, UNet2DModel

    from models.ddpm_unet import ddpm_unet_config

    plain = lambda config: {key: list(value) if isinstance(value, tuple) else value for key, value in dict(config).items()}  # noqa: E731
    unet = UNet2DModel(**ddpm_unet_config("tiny", 16))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"kind": "ddpm", "model_config": plain(unet.config), "model": unet.state_dict(), "epoch": 30,
                "scheduler_config": plain(DDPMScheduler(num_train_timesteps=1000).config), "config": {"dataset": "demo"}}, path)


def test_test_script_installs_the_app_requirements(tmp_path):
    from tests.test_smoke_everything import run_shell_script

    calls = run_shell_script(tmp_path, "scripts/test.sh", ["-q", "tests/test_app.py"], {})
    assert any("requirements-app.txt" in call for call in calls[:-1])


def test_an_upload_over_the_byte_limit_is_refused_at_the_door_and_by_the_app(served):
    import httpx

    heavy = served["uploads"]["heavy"]
    with open(heavy, "rb") as handle:  # Gradio's upload route, as the page uses it
        answer = httpx.post(f"{served['url']}/gradio_api/upload", files={"files": (heavy.name, handle, "image/png")})
    assert answer.status_code == 413
    with pytest.raises(UserError, match=r"heavy.png is 1.5 MB, over this app's --max_upload_mb 1; upload a smaller file"):
        app.read_upload(str(heavy), "underwater image", app.UploadLimits(1_000_000, 100_000))
    _, low, _, _ = call(served, "/phaseformer_enhance", upload(served["uploads"]["rgb"]), None)
    assert pixels(low).shape == (24, 32, 3)
