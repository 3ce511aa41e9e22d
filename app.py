"""The web demo of every model family: ``python app.py [flags]``, one Gradio page with a tab per family.

Each tab calls the functions ``infer.py`` runs (``pipelines/``: the same loading, checks and sampling), so a picture in
the page is the file ``infer.py`` writes for the same weights, seed and settings. Weights are read from local paths
given by the flags of infer.py's subcommands (``--model``, ``--checkpoint``, ``--dit_checkpoint``/``--unet_path`` with
``--vavae_path``, ``--pretrained_model_path`` with ``--seesr_model_path``); a family without them is a tab that names
the flag and file it needs. With no flags the DDPM tab serves the checkpoint ``scripts/demo.sh`` trains.

Safe by default: the server listens on 127.0.0.1 only (``--host 0.0.0.0`` opens it to the LAN), makes no public share
link unless ``--share``, asks for a password with ``--auth user:pass``, refuses uploads over ``--max_upload_mb`` and
``--max_upload_pixels``, and serves only files under ``--output_dir``. Nothing is downloaded and Gradio's analytics
are off. Each model runs one job at a time from a bounded queue. See docs/app.md.

    python app.py                                         # the demo's DDPM checkpoint on http://127.0.0.1:7860
    python app.py --model ckpt.pt --checkpoint netG_model_best.pth --dit_checkpoint best.ckpt --vavae_path vavae.pt
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
from dataclasses import dataclass, field
from pathlib import Path

from utils.cli import add_flag
from utils.config import ArgumentParser
from utils.errors import DataError, UserError, run_cli
from utils.validators import int_at_least, int_between, positive_float, positive_int, zero_or_at_least

DEMO_CHECKPOINT = Path("demo_output/checkpoints/demo_32x32/ddpm_final.pt")  # what scripts/demo.sh trains
MIN_SIDE = 16  # px: smaller uploads are refused (Phaseformer pads to 8 px, SSIM needs a 7 px window, SeeSR a latent)
MAX_SAMPLES = 64  # images one DDPM or user request may ask for
SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from utils.cli import add_ram_arguments

    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 opens the app to the LAN, "
                        "then add --auth)")
    server.add_argument("--port", type=int_between(1, 65535), default=7860, help="port (default 7860, Gradio's)")
    server.add_argument("--share", action="store_true",
                        help="also make a public *.gradio.live link through Gradio's relay (default off: nothing leaves this machine)")
    server.add_argument("--auth", default=None, metavar="USER:PASS", help="ask for this user name and password (default none)")
    server.add_argument("--output_dir", default="app_output",
                        help="the only folder the app writes and serves files from: results and uploads (default ./app_output)")
    server.add_argument("--queue_size", type=positive_int, default=8,
                        help="requests waiting per app; more are refused until the queue drains (default 8)")
    server.add_argument("--max_upload_mb", type=positive_float, default=20.0, help="largest upload in MB (default 20)")
    server.add_argument("--max_upload_pixels", type=positive_int, default=4096 * 4096,
                        help="largest upload in pixels, width x height (default 4096x4096)")
    server.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="where the models run (default auto)")

    ddpm = parser.add_argument_group("pixel DDPM tab (infer.py ddpm)")
    ddpm.add_argument("--model", nargs="+", default=None, metavar="CKPT",
                      help=f"ddpm_*.pt checkpoints or diffusers DDPM folders, picked in the tab (default {DEMO_CHECKPOINT} when "
                      "scripts/demo.sh has written it)")

    phase = parser.add_argument_group("Phaseformer tab (infer.py phaseformer)")
    phase.add_argument("--checkpoint", default=None,
                       help="netG_model_*.pth from train_phaseformer.py or a .safetensors from scripts/convert_phaseformer.py")
    phase.add_argument("--tile", type=zero_or_at_least(16), default=0,
                       help="enhance images larger than N px in overlapping tiles, as infer.py phaseformer --tile (default 0: whole)")

    user = parser.add_argument_group("user generation tab (infer.py user)")
    user.add_argument("--dit_checkpoint", default=None, metavar="CKPT", help="best.ckpt or last.ckpt of train_dit_user.py")
    user.add_argument("--unet_path", default=None,
                      help="a train_dit_user.py UNet checkpoint, or a diffusers UNet folder (then also --num_users)")
    user.add_argument("--num_users", type=positive_int, default=None, help="with a UNet folder: the users it knows")
    add_flag(user, "--vavae_path", "--vae_path", default=None, metavar="PATH", help="the VAE the latents were made with")
    user.add_argument("--vavae_config", choices=("f16d32", "tiny"), default="f16d32", help="architecture of a .pt VA-VAE (default f16d32)")
    user.add_argument("--classifier", default=None,
                      help="classifier.pt of scripts/eval_user_generation.py: show its predicted user beside each image")
    user.add_argument("--classifier_image_size", type=positive_int, default=256,
                      help="the --image_size the classifier's evaluation used (default 256, as scripts/eval_user_generation.py)")

    seesr = parser.add_argument_group("SeeSR tab (infer.py seesr)")
    seesr.add_argument("--pretrained_model_path", default=None, help="local diffusers Stable Diffusion 2 base folder")
    seesr.add_argument("--seesr_model_path", nargs="+", default=None, metavar="FOLDER",
                       help="SeeSR release folders or checkpoint-<step>/ folders, picked in the tab; two are compared side by side")
    seesr.add_argument("--turbo_model_path", default=None,
                       help="a turbo base folder (sd-turbo): each checkpoint is also offered as SeeSR-Turbo, as infer.py seesr "
                       "--pretrained_model_path sd-turbo runs it")
    seesr.add_argument("--process_size", type=int_at_least(8), default=512,
                       help="as infer.py seesr --process_size: small images are enlarged to this first (default 512)")
    add_ram_arguments(seesr)
    args = parser.parse_args(argv)
    if args.auth is not None and (":" not in args.auth or not args.auth.split(":", 1)[0] or not args.auth.split(":", 1)[1]):
        parser.error("--auth takes USER:PASS, a user name and a password joined by a colon")
    if args.dit_checkpoint and args.unet_path:
        parser.error("--dit_checkpoint and --unet_path are two ways to give the one user-generation model; pass one of them")
    if bool(args.pretrained_model_path) != bool(args.seesr_model_path):
        parser.error("the SeeSR tab needs both --pretrained_model_path (Stable Diffusion 2 base) and --seesr_model_path")
    if args.turbo_model_path and not args.seesr_model_path:
        parser.error("--turbo_model_path runs the --seesr_model_path checkpoints as SeeSR-Turbo; add --pretrained_model_path "
                     "and --seesr_model_path")
    return args


# ----------------------------------------------------------------------------------------------- shared helpers

def infer_args(argv: list[str]) -> argparse.Namespace:
    """``infer.parse_args(argv)``: the settings checked exactly as on infer.py's command line; a bad one is a UserError."""
    import infer

    errors = io.StringIO()
    try:  # the house parser prints its one error line and exits; that line becomes the page's message
        with contextlib.redirect_stderr(errors):
            return infer.parse_args(argv)
    except SystemExit:
        message = errors.getvalue().strip().splitlines()
        raise UserError((message[-1] if message else "invalid setting").removeprefix("error: ")) from None


@dataclass
class UploadLimits:
    """--max_upload_mb and --max_upload_pixels, as bytes and pixels."""

    max_bytes: int
    max_pixels: int


def read_upload(path: str | None, what: str, limits: UploadLimits) -> tuple[object, str]:
    """An uploaded file as the RGB image infer.py reads (``utils.images.load_rgb``) and a note on any conversion.

    Refused with one sentence: no file, too many bytes or pixels, smaller than MIN_SIDE, 16-bit grayscale (Pillow
    would clip it to white, so infer.py would read it wrong too), not an image or truncated. Converted as infer.py
    reads them: transparent images composited on white, grayscale and palette images repeated to RGB.
    """
    from PIL import Image, UnidentifiedImageError

    from utils.images import load_rgb

    if not path:
        raise UserError(f"Upload {what} first.")
    name = Path(path).name
    size = Path(path).stat().st_size
    if size > limits.max_bytes:
        raise UserError(f"The {what} {name} is {size / 1e6:.1f} MB, over this app's --max_upload_mb "
                        f"{limits.max_bytes / 1e6:g}; upload a smaller file.")
    try:
        with Image.open(path) as image:  # the header only: the pixel limit is checked before anything is decoded
            width, height, mode, transparent = image.width, image.height, image.mode, "transparency" in image.info
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise UserError(f"The {what} {name} is not an image this app can read; upload a PNG or JPEG.") from None
    if width * height > limits.max_pixels:
        raise UserError(f"The {what} {name} is {width}x{height} px, over this app's --max_upload_pixels "
                        f"{limits.max_pixels}; upload a smaller image.")
    if min(width, height) < MIN_SIDE:
        raise UserError(f"The {what} {name} is {width}x{height} px; upload an image of at least {MIN_SIDE} px per side.")
    if mode in SIXTEEN_BIT_MODES:
        raise UserError(f"The {what} {name} is a 16-bit or floating-point grayscale image ({mode}); save it as an 8-bit "
                        "PNG or JPEG and upload that.")
    try:
        picture = load_rgb(path)
    except DataError:
        raise UserError(f"The {what} {name} is damaged or truncated (it cannot be decoded); upload the whole file again.") from None
    note = ""
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and transparent):
        note = f"The {what} has transparency: composited on white, as infer.py reads it."
    elif mode in ("L", "1", "P"):
        note = f"The {what} is {'grayscale' if mode != 'P' else 'a palette image'}: read as RGB, as infer.py reads it."
    return picture, note


def page_errors(function):
    """Run a handler; a user error becomes a message in the page (gr.Error), and the app keeps serving."""
    import functools

    import gradio as gr

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except UserError as error:  # DataError and CheckpointError too
            raise gr.Error(str(error), print_exception=False) from None

    return wrapper


def progress_over(progress, description: str):
    """A ``progress`` wrapper for a sampling loop's timesteps that moves Gradio's bar in the page."""
    return lambda timesteps: progress.tqdm(timesteps, desc=description)


def missing_tab(text: str) -> None:
    import gradio as gr

    gr.Markdown(text)


# ---------------------------------------------------------------------------------------------------- pixel DDPM

@dataclass
class DDPMTab:
    """The DDPM checkpoints, loaded once; requests build infer.py ddpm's settings and call pipelines.ddpm.sample_picture."""

    paths: list[str]
    device: str
    models: dict = field(default_factory=dict)
    jobs: int = 0  # requests run: a second click while one runs must not start another

    def load(self) -> None:
        from pipelines.ddpm import load_models

        for path in self.paths:
            self.models[path] = load_models([path], 1)[0]

    def settings(self, path: str, sampler: str, steps: int, seed: int, extra: list[str]) -> argparse.Namespace:
        from pipelines.ddpm import check_modes, check_steps

        args = infer_args(["ddpm", "--model", path, "--sampler", sampler, "--num_inference_steps", str(int(steps)),
                           "--seed", str(int(seed)), "--device", self.device, "--output_dir", ".", *extra])
        check_modes(args)
        check_steps(args.num_inference_steps, self.models[path][2], path)
        return args

    def picture(self, args: argparse.Namespace, progress):
        from pipelines.ddpm import sample_picture
        from utils.accelerator import resolve_device

        self.jobs += 1
        return sample_picture(args, [self.models[args.model]], resolve_device(args.device),
                              progress=progress_over(progress, f"{args.sampler} {args.num_inference_steps} steps"))

    def build(self) -> None:
        import gradio as gr

        from models.ddpm_sampling import SAMPLERS

        samplers = list(SAMPLERS.names())
        gr.Markdown("Samples of a pixel DDPM checkpoint (EMA weights), as `infer.py ddpm` draws them.")
        with gr.Row():
            with gr.Column(scale=1):
                checkpoint = gr.Dropdown(self.paths, value=self.paths[0], label="checkpoint (--model)", elem_id="ddpm_checkpoint")
                sampler = gr.Dropdown(samplers, value="dpmsolver++", label="sampler (--sampler)", elem_id="ddpm_sampler")
                steps = gr.Number(25, label="steps (--num_inference_steps)", precision=0, minimum=1, elem_id="ddpm_steps")
                seed = gr.Number(0, label="seed (--seed)", precision=0, minimum=0, elem_id="ddpm_seed")
                count = gr.Slider(1, MAX_SAMPLES, value=16, step=1, label="images (--num_samples)", elem_id="ddpm_count")
                frames = gr.Slider(2, 16, value=8, step=1, label="interpolation frames (--frames)", elem_id="ddpm_frames")
                with gr.Row():
                    sample_button = gr.Button("Sample", variant="primary", elem_id="ddpm_sample")
                    interpolate_button = gr.Button("Interpolate", elem_id="ddpm_interpolate")
            with gr.Column(scale=2):
                grid = gr.Image(label="samples", type="pil", format="png", elem_id="ddpm_grid", interactive=False, height=420)
                strip = gr.Image(label="interpolation between the two starting noises of the seed", type="pil",
                                 format="png", elem_id="ddpm_strip", interactive=False, height=160)

        @page_errors
        def sample(path, sampler, steps, seed, count, progress=gr.Progress()):
            args = self.settings(path, sampler, steps, seed, ["--num_samples", str(int(count))])
            return self.picture(args, progress)

        @page_errors
        def interpolate(path, sampler, steps, seed, frames, progress=gr.Progress()):
            args = self.settings(path, sampler, steps, seed, ["--interpolate", "--frames", str(int(frames))])
            return self.picture(args, progress)

        event = {"concurrency_limit": 1, "concurrency_id": "ddpm", "trigger_mode": "once"}
        sample_button.click(sample, [checkpoint, sampler, steps, seed, count], grid, api_name="ddpm_sample", **event)
        interpolate_button.click(interpolate, [checkpoint, sampler, steps, seed, frames], strip, api_name="ddpm_interpolate", **event)


# --------------------------------------------------------------------------------------------------- Phaseformer

@dataclass
class PhaseformerTab:
    """One Phaseformer checkpoint, loaded as infer.py phaseformer loads it; requests call pipelines.phaseformer.enhance_image."""

    checkpoint: str
    device: str
    tile: int
    limits: UploadLimits
    model: object = None
    info: dict = field(default_factory=dict)

    def load(self) -> None:
        from models.phaseformer_enhance import load_phaseformer_for_inference
        from utils.accelerator import resolve_device
        from utils.errors import CheckpointError

        if not Path(self.checkpoint).is_file():
            raise CheckpointError(f"--checkpoint {self.checkpoint} does not exist; pass netG_model_best.pth of train_phaseformer.py "
                                  "or a .safetensors from scripts/convert_phaseformer.py.")
        model, self.info = load_phaseformer_for_inference(self.checkpoint)
        self.model = model.to(resolve_device(self.device))

    def enhance(self, upload: str | None, reference_upload: str | None):
        """``(input, L, H, scores, notes)`` of one upload, as infer.py phaseformer --underwater_metrics [--gt_dir] computes them."""
        from pipelines.phaseformer import enhance_image
        from utils.images import pil_to_tensor

        picture, note = read_upload(upload, "underwater image", self.limits)
        notes = [note] if note else []
        device = next(self.model.parameters()).device
        image = pil_to_tensor(picture, (0.0, 1.0))[None].to(device)
        reference = None
        if reference_upload:
            reference_picture, reference_note = read_upload(reference_upload, "reference image", self.limits)
            if reference_picture.size != picture.size:
                raise UserError(f"The reference is {reference_picture.width}x{reference_picture.height} px but the image is "
                                f"{picture.width}x{picture.height} px; upload the reference of this image, at its size.")
            reference = pil_to_tensor(reference_picture, (0.0, 1.0))[None].to(device)
            notes += [reference_note] if reference_note else []
        outputs, scores = enhance_image(self.model, image, value_range=self.info["value_range"], heads=("L", "H"),
                                        tile=self.tile, tile_overlap=min(32, self.tile // 2), reference=reference,
                                        underwater_metrics=True, name=Path(upload).name)
        return picture, outputs["L"], outputs["H"], scores, notes

    def build(self) -> None:
        import gradio as gr

        gr.Markdown("Underwater enhancement with Phaseformer, as `infer.py phaseformer` computes it: the 1x (L) and 2x (H) "
                    "outputs, UIQM and UCIQE of the input and of L (no reference needed), PSNR/SSIM of L when a reference "
                    "image of the same size is uploaded.")
        with gr.Row():
            with gr.Column(scale=1):
                upload = UploadImage(label="underwater image", type="filepath", elem_id="phaseformer_input", height=260)
                reference = UploadImage(label="reference (optional: PSNR/SSIM)", type="filepath", elem_id="phaseformer_reference",
                                        height=200)
                button = gr.Button("Enhance", variant="primary", elem_id="phaseformer_run")
                scores = gr.Markdown(elem_id="phaseformer_scores")
            with gr.Column(scale=2):
                slider = gr.ImageSlider(label="before / after (L)", type="pil", format="png", elem_id="phaseformer_slider",
                                        interactive=False)
                with gr.Row():
                    low = gr.Image(label="L: input size", type="pil", format="png", elem_id="phaseformer_L", interactive=False, height=260)
                    high = gr.Image(label="H: twice the size", type="pil", format="png", elem_id="phaseformer_H", interactive=False,
                                    height=260)

        @page_errors
        def enhance(upload, reference, progress=gr.Progress()):
            progress(0, desc="enhancing")
            picture, low_image, high_image, values, notes = self.enhance(upload, reference)
            lines = ["| | input | L |", "|---|---|---|",
                     f"| UIQM | {values['uiqm_input']:.4f} | {values['uiqm']:.4f} |",
                     f"| UCIQE | {values['uciqe_input']:.4f} | {values['uciqe']:.4f} |"]
            if "psnr" in values:
                lines += [f"| PSNR (dB) | | {values['psnr']:.4f} |", f"| SSIM | | {values['ssim']:.4f} |"]
            text = "\n".join(lines + [""] + [f"*{note}*" for note in notes])
            return (picture, low_image), low_image, high_image, text

        button.click(enhance, [upload, reference], [slider, low, high, scores], api_name="phaseformer_enhance",
                     concurrency_limit=1, concurrency_id="phaseformer", trigger_mode="once")


# ----------------------------------------------------------------------------------------------- user generation

@dataclass
class UserTab:
    """A user-generation model and its VAE, loaded as infer.py user loads them; requests call pipelines.user.sample_items."""

    base: list[str]  # infer.py user flags naming the model, VAE, device and output folder
    classifier_path: str | None
    classifier_image_size: int
    model: object = None
    classifier: object = None
    classifier_users: list = field(default_factory=list)
    classifier_size: int = 128

    def load(self) -> None:
        import pipelines.user as user

        args = infer_args(self.base)
        self.model = user.load_model(args)
        user.sampling_plan(args, self.model)
        user.load_vae(args, self.model)
        if self.classifier_path:
            import torch

            from utils.user_generation_metrics import build_user_classifier

            if not Path(self.classifier_path).is_file():
                raise UserError(f"--classifier {self.classifier_path} does not exist; pass the classifier.pt that "
                                "scripts/eval_user_generation.py wrote, or drop the flag.")
            saved = torch.load(self.classifier_path, map_location="cpu", weights_only=True)
            if not {"model", "user_ids", "classifier_size"} <= set(saved):
                raise UserError(f"--classifier {self.classifier_path} is not a classifier.pt of scripts/eval_user_generation.py.")
            self.classifier = build_user_classifier(len(saved["user_ids"]))
            self.classifier.load_state_dict(saved["model"])
            self.classifier = self.classifier.to(self.model.device).eval()
            self.classifier_users, self.classifier_size = list(saved["user_ids"]), int(saved["classifier_size"])

    @property
    def num_users(self) -> int:
        return self.model.bundle.num_users

    def generate(self, user_ids: str, per_user: int, guidance: float, steps: int, seed: int, progress=None):
        """``[(PIL image, user, index)]`` of the users in ``user_ids`` ("1 3 5" or "1-4"), per_user each."""
        import pipelines.user as user
        from utils.images import tensor_to_pil

        users = parse_user_ids(user_ids)
        if len(users) * int(per_user) > MAX_SAMPLES:
            raise UserError(f"{len(users)} users x {int(per_user)} samples is more than the {MAX_SAMPLES} images one request "
                            "makes; ask for fewer users or samples (infer.py user writes any number).")
        args = infer_args([*self.base, "--user_ids", *map(str, users), "--num_samples_per_user", str(int(per_user)),
                           "--guidance_scale", f"{float(guidance)!r}", "--num_inference_steps", str(int(steps)),
                           "--seed", str(int(seed))])
        user.check_request(args)
        plan = user.sampling_plan(args, self.model)
        items = [(u, index) for u in plan.users for index in range(args.start_index, args.start_index + args.num_samples_per_user)]
        pictures = []
        chunks = range(0, len(items), args.batch_size)
        for number, start in enumerate(chunks):  # infer.py user's chunks: the same batches give the same pixels
            if progress is not None:
                progress(number / len(chunks), desc=f"{plan.settings['sampler']} {plan.settings['num_steps']} steps")
            chunk = items[start:start + args.batch_size]
            images, _ = user.sample_items(self.model, plan, chunk, batch_size=args.batch_size)
            pictures += [(tensor_to_pil(image), u, index) for image, (u, index) in zip(images, chunk, strict=True)]
        return pictures

    def predict(self, pictures) -> list[int]:
        """The classifier's user for each picture, read as scripts/eval_user_generation.py reads a generated file."""
        import torch
        import torch.nn.functional as F

        from data.user_images import prepare_image
        from utils.user_generation_metrics import classify

        full = torch.stack([prepare_image(picture, self.classifier_image_size, "crop") for picture in pictures])
        small = F.interpolate(full.float(), size=(self.classifier_size,) * 2, mode="bilinear", antialias=True, align_corners=False)
        small = ((small.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        predicted, _ = classify(self.classifier, small, self.model.device)
        return [self.classifier_users[int(k)] for k in predicted]

    def build(self) -> None:
        import gradio as gr

        settings = self.model.bundle.sampling
        gr.Markdown(f"Spectrograms per user from the {self.model.bundle.backbone} model ({self.num_users} users), as "
                    "`infer.py user` writes them" + (", with the evaluation classifier's predicted user" if self.classifier else "")
                    + ".")
        with gr.Row():
            with gr.Column(scale=1):
                users = gr.Textbox("1 2", label=f"user IDs, 1..{self.num_users} (--user_ids; '1 3 5' or '1-4')", elem_id="user_ids")
                per_user = gr.Slider(1, 16, value=4, step=1, label="samples per user (--num_samples_per_user)", elem_id="user_per_user")
                guidance = gr.Number(float(settings.get("guidance_scale", 4.0)), label="guidance (--guidance_scale, 1 = none)",
                                     minimum=0, elem_id="user_guidance")
                steps = gr.Number(int(settings.get("num_steps", 50)), label="steps (--num_inference_steps)", precision=0, minimum=1,
                                  elem_id="user_steps")
                seed = gr.Number(0, label="seed (--seed)", precision=0, minimum=0, elem_id="user_seed")
                button = gr.Button("Generate", variant="primary", elem_id="user_run")
            with gr.Column(scale=2):
                gallery = gr.Gallery(label="samples", columns=4, format="png", elem_id="user_gallery", interactive=False)

        @page_errors
        def generate(user_ids, per_user, guidance, steps, seed, progress=gr.Progress()):
            pictures = self.generate(user_ids, per_user, guidance, steps, seed, progress)
            predicted = self.predict([p for p, _, _ in pictures]) if self.classifier is not None else None
            captions = [f"user {u} #{index:03d}" + (f": classifier says user {predicted[k]}" if predicted else "")
                        for k, (_, u, index) in enumerate(pictures)]
            return [(picture, caption) for (picture, _, _), caption in zip(pictures, captions, strict=True)]

        button.click(generate, [users, per_user, guidance, steps, seed], gallery, api_name="user_generate",
                     concurrency_limit=1, concurrency_id="user", trigger_mode="once")


def parse_user_ids(text: str) -> list[int]:
    """``"1 3 5"``, ``"1,3"`` or ``"2-4"`` as a list of IDs (their range is checked against the model by pipelines.user)."""
    users: list[int] = []
    for part in str(text).replace(",", " ").split():
        first, _, last = part.partition("-")
        if not first.isdigit() or (last and not last.isdigit()):
            raise UserError(f"User IDs {text!r}: write numbers such as '1 3 5' or a range such as '1-4'.")
        users += list(range(int(first), int(last or first) + 1))
    if not users:
        raise UserError("Give at least one user ID, such as '1' or '1-4'.")
    return users


# --------------------------------------------------------------------------------------------------------- SeeSR

class EditedTags:
    """RAM as a tagger whose tags are the user's: RAM's image embeddings with the tags typed in the page."""

    def __init__(self, tagger, tags: str):
        self.tagger, self.tags = tagger, tags

    def __call__(self, images):
        _, embeds = self.tagger(images)
        return [self.tags] * len(images), embeds


@dataclass
class SeeSRTab:
    """SeeSR checkpoints (and their turbo form), loaded as infer.py seesr loads them; requests call
    pipelines.seesr.super_resolve with the page's settings."""

    base: list[str]  # infer.py seesr flags shared by every model: RAM, device, output folder, process size
    models: dict  # name -> (pretrained_model_path, seesr_model_path)
    limits: UploadLimits
    loaded: dict = field(default_factory=dict)

    def load(self) -> None:
        from pipelines.seesr import load_pipeline

        for name, (base, checkpoint) in self.models.items():
            self.loaded[name] = load_pipeline(infer_args(self.flags(base, checkpoint)))
            for message in self.loaded[name].messages:
                print(f"{name}: {message}")

    def flags(self, base: str, checkpoint: str, *extra: str) -> list[str]:
        return ["seesr", "--pretrained_model_path", base, "--seesr_model_path", checkpoint, "--image_path", ".", *self.base, *extra]

    def tags(self, upload: str | None, name: str) -> str:
        """RAM's (+ DAPE's) tags of the upload, as infer.py seesr puts them in the prompt."""
        from utils.images import pil_to_tensor

        picture, _ = read_upload(upload, "low-resolution image", self.limits)
        inference = self.loaded[name]
        if inference.tagger is None:
            return ""
        found, _ = inference.tagger(pil_to_tensor(picture, (0.0, 1.0))[None].to(inference.device))
        return found[0]

    def super_resolve(self, upload: str | None, name: str, tags: str, settings: list[str], seed: int, progress_bar: bool = False):
        """``(LR picture, SR picture, prompt, note)``: infer.py seesr on the upload with ``settings`` (its flags).

        Empty ``tags`` are RAM's own (infer.py's prompt); typed tags replace RAM's tags but keep its image embeddings.
        """
        import dataclasses

        from pipelines.seesr import resolve_settings, super_resolve

        picture, note = read_upload(upload, "low-resolution image", self.limits)
        inference = self.loaded[name]
        base, checkpoint = self.models[name]
        request = resolve_settings(infer_args(self.flags(base, checkpoint, "--seed", str(int(seed)), *settings)))
        request.sample_times = 1
        tags = tags.strip()
        tagger = EditedTags(inference.tagger, tags) if tags and inference.tagger is not None else inference.tagger
        result = super_resolve(dataclasses.replace(inference, settings=request, tagger=tagger), picture, int(seed),
                               tags=tags or None, progress_bar=progress_bar)
        return picture, result.images[0], result.prompt, note

    def build(self) -> None:
        import gradio as gr
        from PIL import Image

        names = list(self.models)
        first = self.loaded[names[0]].settings
        gr.Markdown("x4 real-world super-resolution with SeeSR, as `infer.py seesr` runs it: the prompt is "
                    "`{tags}, {prompt},` + the added prompt; the tags come from RAM (+ DAPE) and can be edited. A second "
                    "checkpoint runs on the same image and seed beside the first (what does the injector change?). "
                    "SeeSR-Turbo (`(turbo)` models) needs 1-4 steps and guidance 1.")
        with gr.Row():
            with gr.Column(scale=1):
                upload = UploadImage(label="low-resolution image", type="filepath", elem_id="seesr_input", height=220)
                model = gr.Dropdown(names, value=names[0], label="checkpoint (--seesr_model_path)", elem_id="seesr_model")
                other = gr.Dropdown(["none", *names], value="none", label="compare with (same image and seed)",
                                    elem_id="seesr_compare")
                with gr.Row():
                    tags_button = gr.Button("Get tags", elem_id="seesr_get_tags")
                    run_button = gr.Button("Super-resolve", variant="primary", elem_id="seesr_run")
                tags = gr.Textbox(label="tags (RAM/DAPE; edit them, or leave empty for RAM's)", elem_id="seesr_tags")
                prompt = gr.Textbox(first.prompt, label="prompt (--prompt)", elem_id="seesr_prompt")
                added = gr.Textbox(first.added_prompt, label="added prompt (--added_prompt)")
                negative = gr.Textbox(first.negative_prompt, label="negative prompt (--negative_prompt)")
                with gr.Row():
                    steps = gr.Number(first.num_inference_steps, label="steps", precision=0, minimum=1, elem_id="seesr_steps")
                    guidance = gr.Number(first.guidance_scale, label="guidance (--guidance_scale)", minimum=0,
                                         elem_id="seesr_guidance")
                    seed = gr.Number(0, label="seed (--seed)", precision=0, minimum=0, elem_id="seesr_seed")
                with gr.Row():
                    start = gr.Dropdown(["lr", "noise"], value=first.start_point, label="start point (--start_point)")
                    colour = gr.Dropdown(["adain", "wavelet", "nofix"], value=first.align_method, label="colour fix (--align_method)")
                    upscale = gr.Number(first.upscale, label="upscale", precision=0, minimum=1, maximum=8, elem_id="seesr_upscale")
            with gr.Column(scale=2):
                slider = gr.ImageSlider(label="LR (bicubic) / SR; comparing: first / second checkpoint", type="pil", format="png",
                                        elem_id="seesr_slider",
                                        interactive=False)
                with gr.Row():
                    output = gr.Image(label="SR", type="pil", format="png", elem_id="seesr_output", interactive=False, height=300)
                    second = gr.Image(label="SR, second checkpoint", type="pil", format="png", elem_id="seesr_second",
                                      interactive=False, height=300)
                used = gr.Markdown(elem_id="seesr_prompt_used")

        @page_errors
        def get_tags(upload, name):
            return self.tags(upload, name)

        @page_errors
        def run(upload, name, other, tags, prompt, added, negative, steps, guidance, seed, start, colour, upscale,
                progress=gr.Progress()):
            settings = ["--prompt", prompt, "--added_prompt", added, "--negative_prompt", negative, "--num_inference_steps",
                        str(int(steps)), "--guidance_scale", f"{float(guidance)!r}", "--start_point", start, "--align_method",
                        colour, "--upscale", str(int(upscale))]
            progress(0, desc=name)
            picture, result, prompt_used, note = self.super_resolve(upload, name, tags, settings, seed)
            lines = [f"**{name}**: `{prompt_used}`"]
            compared = None
            if other != "none":
                progress(0.5, desc=other)
                _, compared, other_prompt, _ = self.super_resolve(upload, other, tags, settings, seed)
                lines.append(f"**{other}**: `{other_prompt}`")
            before = picture.resize(result.size, Image.BICUBIC)
            text = "\n\n".join(lines + ([f"*{note}*"] if note else []))
            return (before, result) if compared is None else (result, compared), result, compared, text

        event = {"concurrency_limit": 1, "concurrency_id": "seesr", "trigger_mode": "once"}
        tags_button.click(get_tags, [upload, model], tags, api_name="seesr_tags", **event)
        run_button.click(run, [upload, model, other, tags, prompt, added, negative, steps, guidance, seed, start, colour, upscale],
                         [slider, output, second, used], api_name="seesr_super_resolve", **event)


# ----------------------------------------------------------------------------------------------------- the page

def UploadImage(**kwargs):  # named like the component it returns
    """gr.Image whose handler gets the uploaded file untouched, so that read_upload (not Pillow inside Gradio) judges it.

    The override is on the instance: a subclass of a Gradio component makes Gradio write a ``.pyi`` stub beside this file.
    """
    import gradio as gr

    component = gr.Image(**kwargs)
    component.preprocess = lambda payload: None if payload is None else str(payload.path)
    return component


def build_app(args: argparse.Namespace):
    """The Blocks page for ``args`` (every model given is loaded first: a wrong path is an error before serving).

    One app per process: Gradio reads its cache folder (here ``--output_dir``/gradio) from the environment.
    """
    output_dir = Path(args.output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ["GRADIO_TEMP_DIR"] = str(output_dir / "gradio")  # uploads and results: the one folder served
    import gradio as gr

    limits = UploadLimits(int(args.max_upload_mb * 1e6), args.max_upload_pixels)
    tabs = {}
    models = args.model or ([str(DEMO_CHECKPOINT)] if DEMO_CHECKPOINT.is_file() else None)
    if models:
        tabs["ddpm"] = DDPMTab(models, args.device)
    if args.checkpoint:
        tabs["phaseformer"] = PhaseformerTab(args.checkpoint, args.device, args.tile, limits)
    if args.dit_checkpoint or args.unet_path:
        if not args.vavae_path:
            raise UserError("--dit_checkpoint/--unet_path need --vavae_path (--vae_path), the VAE the latents were made with.")
        base = ["user", "--dit_checkpoint" if args.dit_checkpoint else "--unet_path", args.dit_checkpoint or args.unet_path,
                "--vavae_path", args.vavae_path, "--vavae_config", args.vavae_config, "--device", args.device,
                "--output_dir", str(output_dir / "user")]
        if args.num_users:
            base += ["--num_users", str(args.num_users)]
        tabs["user"] = UserTab(base, args.classifier, args.classifier_image_size)
    if args.seesr_model_path:
        base = ["--device", args.device, "--output_dir", str(output_dir / "seesr"), "--process_size", str(args.process_size),
                "--ram_path", args.ram_path]
        for flag in ("ram_ft_path", "ram_tag_list", "ram_tag_thresholds"):
            if getattr(args, flag):
                base += [f"--{flag}", getattr(args, flag)]
        names = {}
        for checkpoint in args.seesr_model_path:
            names[Path(checkpoint).name] = (args.pretrained_model_path, checkpoint)
            if args.turbo_model_path:
                names[f"{Path(checkpoint).name} (turbo)"] = (args.turbo_model_path, checkpoint)
        if len(names) < len(args.seesr_model_path) * (2 if args.turbo_model_path else 1):
            raise UserError("Two --seesr_model_path folders have the same name; the tab tells them apart by name, so "
                            "link or copy one under another name.")
        tabs["seesr"] = SeeSRTab(base, names, limits)
    for tab in tabs.values():
        tab.load()

    with gr.Blocks(title="diffusion-lab", analytics_enabled=False, delete_cache=(3600, 24 * 3600)) as demo:
        gr.Markdown("# diffusion-lab\nOne tab per model family; each runs the code of `infer.py`.")
        with gr.Tab("Pixel DDPM", elem_id="tab_ddpm"):
            if "ddpm" in tabs:
                tabs["ddpm"].build()
            else:
                missing_tab(f"No DDPM checkpoint: pass `--model ddpm_best.pt` (train_ddpm_highres.py), or run "
                            f"`bash scripts/demo.sh` to write `{DEMO_CHECKPOINT}`, which the app opens by default.")
        with gr.Tab("Phaseformer", elem_id="tab_phaseformer"):
            if "phaseformer" in tabs:
                tabs["phaseformer"].build()
            else:
                missing_tab("No Phaseformer weights: pass `--checkpoint netG_model_best.pth` (train_phaseformer.py) or a "
                            "`.safetensors` converted by `scripts/convert_phaseformer.py`.")
        with gr.Tab("User generation", elem_id="tab_user"):
            if "user" in tabs:
                tabs["user"].build()
            else:
                missing_tab("No user-generation model: pass `--dit_checkpoint checkpoints/best.ckpt` (train_dit_user.py; or "
                            "`--unet_path`) and `--vavae_path`, the VA-VAE file the latents were made with "
                            "(`--classifier classifier.pt` adds the predicted user).")
        with gr.Tab("SeeSR", elem_id="tab_seesr"):
            if "seesr" in tabs:
                tabs["seesr"].build()
            else:
                missing_tab("No SeeSR model: pass `--pretrained_model_path` (Stable Diffusion 2 base folder) and "
                            "`--seesr_model_path` (SeeSR's release folder or a checkpoint-<step>/ folder; `--ram_path` "
                            "for RAM, `--turbo_model_path` for SeeSR-Turbo).")
    demo.queue(max_size=args.queue_size, default_concurrency_limit=1)
    demo.app_tabs = tabs
    return demo


def page_theme():
    import gradio as gr

    return gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["monospace"])  # no web fonts: nothing is fetched


def launch(demo, args: argparse.Namespace, *, block: bool = True, inline: bool | None = None):
    """Serve ``demo`` with the safe defaults of the flags; returns the share URL with ``--share``, else the local one.

    ``block=False`` returns at once (tests, notebooks); ``inline=True`` also shows the page in a notebook cell's output.
    ``share`` is passed even when False: on Kaggle Gradio would otherwise open a public link by itself.
    """
    auth = tuple(args.auth.split(":", 1)) if args.auth else None
    if args.host not in ("127.0.0.1", "localhost", "::1") and auth is None:
        print(f"note: --host {args.host} lets other machines open this app; add --auth USER:PASS to ask them for a password")
    # allowed_paths stays empty: Gradio then serves only its own cache, which build_app put under --output_dir.
    _, url, share_url = demo.launch(
        server_name=args.host, server_port=args.port, share=args.share, auth=auth, prevent_thread_lock=not block, inline=inline,
        max_file_size=int(args.max_upload_mb * 1e6), allowed_paths=[], ssr_mode=False, mcp_server=False, show_error=True,
        inbrowser=False, theme=page_theme(), footer_links=[],
    )
    return share_url or url


def main(args: argparse.Namespace):
    demo = build_app(args)
    launch(demo, args)


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
