"""Tiled VAE encode/decode whose tiles share one GroupNorm estimate: no colour seams, the untiled result.

From SeeSR's ``utils/vaehook.py`` (cswry/SeeSR, the "Tiled VAE" of pkuliyi2015/multidiffusion-upscaler): the
encoder or decoder is unrolled into a queue of operations (convolutions, activations, residual pushes and adds,
up/downsampling) run tile by tile; every GroupNorm is a synchronisation point where the statistics of all tiles
are pooled and then applied to each tile, so every tile is normalised like the whole image. diffusers' own
``AutoencoderKL`` tiling normalises each tile on its own statistics and blends the overlaps, which leaves
visible colour and brightness seams.

What this file does differently from ``vaehook.py``, and why:

* statistics are exact: each tile contributes only its core (the part it owns, no padding) and per-tile
  means and squared deviations are merged with Chan's parallel formula in fp32, so the pooled mean/variance
  are the whole image's (``vaehook.py`` averages per-tile variances of padded tiles, which drops the spread
  between tile means and counts overlaps twice); fp16/bf16 tiles are normalised in fp32;
* the padding is computed from the network (the receptive field of the tiled operations, rounded up to the
  down-sampling alignment) instead of fixed 32/11 px, so the tile cores equal the untiled computation;
* the low-resolution middle (decoder: ``post_quant_conv``, ``conv_in`` and the mid block; encoder: the mid
  block, output head and ``quant_conv``) runs once on the whole feature map at latent resolution. It holds the
  only non-local operation (self-attention), which ``vaehook.py`` runs per tile (an approximation); at
  latent resolution its activations are 1/16 of the full-resolution ones of the SD VAE (512 channels at 1/8
  side vs 128 channels at full side);
* between two GroupNorms each tile's activations wait on ``storage_device`` (the CPU by default when
  computing on a GPU, as ``vaehook.py`` does), so the accelerator holds one tile's activations at a time
  plus the latent-resolution middle. The stored states together are about one full-resolution activation
  (plus the residual branch while a block is open) times the overlap of the padded tiles; on a CPU they are
  the same memory, so there the peak is near the untiled one, not bounded by the tile
  (bench/bench_seesr_tiled_vae.py measures it). No "fast mode" (``vaehook.py``'s statistics from a
  downscaled copy, which spares the stored states but is approximate).

Inference only (``torch.no_grad``); runs on CPU or GPU. Supports diffusers ``AutoencoderKL`` in the SD layout
(``DownEncoderBlock2D``/``UpDecoderBlock2D`` of ``ResnetBlock2D`` with GroupNorm, ``Downsample2D``/
``Upsample2D``), which is SD2's and SeeSR's.

    with shared_norm_vae_tiling(vae, 1024):   # what SeeSRPipeline uses
        posterior = vae.encode(x).latent_dist
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKLOutput
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.downsampling import Downsample2D
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.upsampling import Upsample2D
from torch import nn

from utils.errors import UserError

NO_TILING = "turn VAE tiling off (--vae_encoder_tiled_size 0 --vae_decoder_tiled_size 0)."


@dataclass
class _Op:
    """One step of the unrolled network: ``apply`` fn, ``norm`` (a GroupNorm sync point), ``push`` fn(h) on
    the residual stack, or ``add`` (pop + h) / divisor; ``zoom`` is output/input resolution, ``reach`` how
    many input pixels beyond an output pixel's own position the step reads."""

    kind: str
    fn: Callable | None = None
    norm: nn.GroupNorm | None = None
    divisor: float = 1.0
    zoom: float = 1.0
    reach: float = 0.0


@dataclass
class _Tile:
    """A tile in the tiled stage's input pixels: what it reads (``read_*``) and the core it owns (``core_*``)."""

    read_y: tuple[int, int]
    read_x: tuple[int, int]
    core_y: tuple[int, int]
    core_x: tuple[int, int]


def _conv_reach(conv: nn.Conv2d) -> int:
    return conv.kernel_size[0] // 2


def _resnet_ops(block: nn.Module) -> list[_Op]:
    """ResnetBlock2D without time embedding or resampling (a VAE block) as push, norm, act, conv, ..., add."""
    if not isinstance(block, ResnetBlock2D) or block.upsample is not None or block.downsample is not None:
        raise UserError(f"Tiled VAE expects plain ResnetBlock2D blocks, found {type(block).__name__}; {NO_TILING}")
    if block.time_emb_proj is not None or not isinstance(block.norm1, nn.GroupNorm):
        raise UserError(f"Tiled VAE expects VAE resnets with GroupNorm and no time embedding; {NO_TILING}")
    shortcut = block.conv_shortcut
    return [
        _Op("push", fn=shortcut if shortcut is not None else (lambda h: h),
            reach=_conv_reach(shortcut) if shortcut is not None else 0),
        _Op("norm", norm=block.norm1),
        _Op("apply", fn=block.nonlinearity),
        _Op("apply", fn=block.conv1, reach=_conv_reach(block.conv1)),
        _Op("norm", norm=block.norm2),
        _Op("apply", fn=block.nonlinearity),
        _Op("apply", fn=block.dropout),
        _Op("apply", fn=block.conv2, reach=_conv_reach(block.conv2)),
        _Op("add", divisor=block.output_scale_factor),
    ]


def _resample_ops(samplers: nn.ModuleList | None) -> list[_Op]:
    ops = []
    for sampler in samplers or []:
        if isinstance(sampler, Downsample2D) and sampler.use_conv:
            # stride-2 convolution: output i reads input 2i .. 2i + k - 1 (after diffusers' (0, 1, 0, 1) pad)
            ops.append(_Op("apply", fn=sampler, zoom=0.5, reach=sampler.conv.kernel_size[0] - 1))
        elif isinstance(sampler, Upsample2D) and sampler.interpolate and not sampler.use_conv_transpose:
            reach = _conv_reach(sampler.conv) / 2 if sampler.use_conv else 0  # the conv runs at twice the size
            ops.append(_Op("apply", fn=sampler, zoom=2.0, reach=reach))
        else:
            raise UserError(f"Tiled VAE does not support {type(sampler).__name__} resampling; {NO_TILING}")
    return ops


def _encoder_ops(vae: AutoencoderKL) -> list[_Op]:
    """Encoder from ``conv_in`` to the last down block (full to 1/8 resolution): the tiled stage."""
    encoder = vae.encoder
    ops = [_Op("apply", fn=encoder.conv_in, reach=_conv_reach(encoder.conv_in))]
    for block in encoder.down_blocks:
        if getattr(block, "attentions", None):
            raise UserError(f"Tiled VAE supports down blocks without attention (DownEncoderBlock2D); {NO_TILING}")
        for resnet in block.resnets:
            ops += _resnet_ops(resnet)
        ops += _resample_ops(block.downsamplers)
    return ops


def _decoder_ops(vae: AutoencoderKL) -> list[_Op]:
    """Decoder from the first up block to ``conv_out`` (1/8 to full resolution): the tiled stage."""
    decoder = vae.decoder
    if not isinstance(decoder.conv_norm_out, nn.GroupNorm):
        raise UserError(f"Tiled VAE supports the GroupNorm decoder (norm_type 'group'), not spatial norms; {NO_TILING}")
    ops = []
    for block in decoder.up_blocks:
        if getattr(block, "attentions", None):
            raise UserError(f"Tiled VAE supports up blocks without attention (UpDecoderBlock2D); {NO_TILING}")
        for resnet in block.resnets:
            ops += _resnet_ops(resnet)
        ops += _resample_ops(block.upsamplers)
    ops += [
        _Op("norm", norm=decoder.conv_norm_out),
        _Op("apply", fn=decoder.conv_act),
        _Op("apply", fn=decoder.conv_out, reach=_conv_reach(decoder.conv_out)),
    ]
    return ops


def tile_padding(ops: list[_Op]) -> tuple[int, int]:
    """(padding, alignment) in the tiled stage's input pixels: the receptive field's half-width of ``ops``
    rounded up to the alignment that keeps every downsampling grid of a tile on the image's grid."""
    zoom, margin, smallest = 1.0, 0.0, 1.0
    for op in ops:
        margin += op.reach / zoom
        zoom *= op.zoom
        smallest = min(smallest, zoom)
    align = round(1 / smallest)
    return align * math.ceil(margin / align), align


def split_tiles(height: int, width: int, tile_size: int, padding: int, align: int = 1) -> list[_Tile]:
    """Cover ``height x width`` with near-equal cores of at most ``tile_size`` (multiples of ``align`` except at
    the far edges), each read with ``padding`` more pixels on every side that has image."""

    def spans(length: int) -> list[tuple[int, int]]:
        count = math.ceil(length / tile_size)
        core = align * math.ceil(math.ceil(length / count) / align)
        count = math.ceil(length / core)
        return [(index * core, min((index + 1) * core, length)) for index in range(count)]

    tiles = []
    for core_y in spans(height):
        for core_x in spans(width):
            tiles.append(
                _Tile(
                    read_y=(max(0, core_y[0] - padding), min(height, core_y[1] + padding)),
                    read_x=(max(0, core_x[0] - padding), min(width, core_x[1] + padding)),
                    core_y=core_y,
                    core_x=core_x,
                )
            )
    return tiles


class _GroupStatistics:
    """Per-(sample, group) mean and biased variance pooled over tiles (Chan et al.'s parallel merge, fp32)."""

    def __init__(self, groups: int):
        self.groups = groups
        self.count = 0
        self.mean = None
        self.m2 = None

    def add(self, x: torch.Tensor) -> None:
        values = x.float().reshape(x.shape[0], self.groups, -1)
        count = values.shape[-1]
        mean = values.mean(-1)
        m2 = (values - mean[..., None]).square().sum(-1)
        if self.mean is None:
            self.count, self.mean, self.m2 = count, mean, m2
            return
        mean, m2 = mean.to(self.mean.device), m2.to(self.mean.device)
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.count * count / total)
        self.count = total

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mean, self.m2 / self.count


def _group_norm(x: torch.Tensor, norm: nn.GroupNorm, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """``norm`` applied to ``x`` with given per-(sample, group) statistics, computed in fp32."""
    values = x.float().reshape(x.shape[0], norm.num_groups, -1)
    mean, var = mean.to(x.device), var.to(x.device)
    values = (values - mean[..., None]) * torch.rsqrt(var[..., None] + norm.eps)
    out = values.reshape(x.shape)
    if norm.affine:
        out = out * norm.weight.float().view(1, -1, 1, 1) + norm.bias.float().view(1, -1, 1, 1)
    return out.to(x.dtype)


def _core(x: torch.Tensor, tile: _Tile, zoom: float) -> tuple[torch.Tensor, tuple[slice, slice]]:
    """The core of a tile's activation at ``zoom`` (local crop) and where it goes in the whole map."""
    # diffusers' Downsample2D maps n pixels to floor(n / 2); tile origins are multiples of the alignment
    y0, y1 = math.floor(tile.core_y[0] * zoom), math.floor(tile.core_y[1] * zoom)
    x0, x1 = math.floor(tile.core_x[0] * zoom), math.floor(tile.core_x[1] * zoom)
    oy, ox = tile.read_y[0] * zoom, tile.read_x[0] * zoom
    local = x[..., int(y0 - oy) : int(y1 - oy), int(x0 - ox) : int(x1 - ox)]
    return local, (slice(int(y0), int(y1)), slice(int(x0), int(x1)))


def run_tiled(
    ops: list[_Op],
    source: torch.Tensor,
    tile_size: int,
    compute_device: torch.device,
    storage_device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Run ``ops`` on ``source`` tile by tile with every GroupNorm's statistics pooled over all tiles."""
    padding, align = tile_padding(ops)
    height, width = source.shape[-2:]
    tiles = split_tiles(height, width, tile_size, padding, align)
    if len(tiles) == 1:  # nothing to pool across: keep the one tile where it computes
        storage_device = compute_device
    # segments: [norm that opens it (None for the first), the ops up to the next norm]
    segments, zoom = [[None, []]], 1.0
    for op in ops:
        if op.kind == "norm":
            segments.append([op.norm, []])
        else:
            segments[-1][1].append(op)
    states: list = [None] * len(tiles)
    output = None
    statistics = None
    for index, (norm, segment) in enumerate(segments):
        next_norm = segments[index + 1][0] if index + 1 < len(segments) else None
        pooled = _GroupStatistics(next_norm.num_groups) if next_norm is not None else None
        end_zoom = zoom
        for op in segment:
            end_zoom *= op.zoom
        for number, tile in enumerate(tiles):
            if index == 0:
                h = source[..., slice(*tile.read_y), slice(*tile.read_x)].to(compute_device, dtype)
                stack = []
            else:
                h, stack = states[number]
                h, stack = h.to(compute_device), [item.to(compute_device) for item in stack]
                states[number] = None
            if norm is not None:
                h = _group_norm(h, norm, *statistics)
            for op in segment:
                if op.kind == "apply":
                    h = op.fn(h)
                elif op.kind == "push":
                    stack.append(op.fn(h))
                else:
                    h = stack.pop() + h
                    if op.divisor != 1.0:
                        h = h / op.divisor
            core, place = _core(h, tile, end_zoom)
            if pooled is not None:
                pooled.add(core)
                states[number] = (h.to(storage_device), [item.to(storage_device) for item in stack])
            else:
                if output is None:
                    size = (math.floor(height * end_zoom), math.floor(width * end_zoom))
                    output = torch.empty(*h.shape[:2], *size, device=compute_device, dtype=h.dtype)
                output[..., place[0], place[1]] = core
            del h, stack, core
        if pooled is not None:
            statistics = pooled.result()
        zoom = end_zoom
    return output


def _devices(vae: AutoencoderKL, storage_device) -> tuple[torch.device, torch.device]:
    compute = vae.device
    if storage_device is None:
        storage_device = "cpu" if compute.type != "cpu" else compute
    return compute, torch.device(storage_device)


def _check_tile(tile_size: int, minimum: int, what: str) -> None:
    if int(tile_size) < minimum:
        raise UserError(f"Expected a VAE {what} tile size of at least {minimum} px, found {tile_size}.")


@torch.no_grad()
def tiled_encode(
    vae: AutoencoderKL, images: torch.Tensor, tile_size: int, storage_device: torch.device | str | None = None
) -> DiagonalGaussianDistribution:
    """``vae.encode(images).latent_dist`` computed in tiles of ``tile_size`` image pixels.

    ``images``: ``[B, 3, H, W]`` in [-1, 1], any size. Returns the posterior over ``[B, C, floor(H/8), floor(W/8)]``
    latents (unscaled, as diffusers'). ``storage_device``: where tiles wait between GroupNorms (default: CPU
    when the VAE is on an accelerator, else the VAE's device).
    """
    ops = _encoder_ops(vae)
    _, align = tile_padding(ops)
    _check_tile(tile_size, align, "encoder")
    compute, storage = _devices(vae, storage_device)
    tile_size = int(tile_size) // align * align
    features = run_tiled(ops, images, tile_size, compute, storage, vae.dtype)
    encoder = vae.encoder
    features = encoder.mid_block(features)
    features = encoder.conv_out(encoder.conv_act(encoder.conv_norm_out(features)))
    if vae.quant_conv is not None:
        features = vae.quant_conv(features)
    return DiagonalGaussianDistribution(features)


@torch.no_grad()
def tiled_decode(
    vae: AutoencoderKL, latents: torch.Tensor, tile_size: int, storage_device: torch.device | str | None = None
) -> torch.Tensor:
    """``vae.decode(latents).sample`` computed in tiles of ``tile_size`` latent pixels.

    ``latents``: ``[B, C, h, w]`` unscaled (already divided by ``scaling_factor``), any size. Returns
    ``[B, 3, 8h, 8w]`` images in about [-1, 1] in the VAE's dtype. ``storage_device`` as :func:`tiled_encode`.
    """
    _check_tile(tile_size, 1, "decoder")
    compute, storage = _devices(vae, storage_device)
    decoder = vae.decoder
    features = latents.to(compute, vae.dtype)
    if vae.post_quant_conv is not None:
        features = vae.post_quant_conv(features)
    features = decoder.mid_block(decoder.conv_in(features), None)
    return run_tiled(_decoder_ops(vae), features, int(tile_size), compute, storage, vae.dtype)


@contextlib.contextmanager
def shared_norm_vae_tiling(vae: AutoencoderKL, tile_pixels: int | None, storage_device=None):
    """Temporarily make ``vae.encode``/``vae.decode`` tile with shared GroupNorm statistics; drop-in for
    the tiling ``SeeSRPipeline`` used before (``tile_pixels`` image pixels; the decoder tiles ``tile_pixels // 8``
    latent pixels; ``None`` or 0: no tiling)."""
    if not tile_pixels:
        yield
        return
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    patched = {"encode", "decode"} - set(vars(vae))

    def encode(x, return_dict: bool = True):
        posterior = tiled_encode(vae, x, tile_pixels, storage_device)
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def decode(z, return_dict: bool = True, generator=None):
        sample = tiled_decode(vae, z, max(1, int(tile_pixels) // factor), storage_device)
        return DecoderOutput(sample=sample) if return_dict else (sample,)

    if not patched == {"encode", "decode"}:
        raise UserError("shared_norm_vae_tiling cannot nest on the same VAE; leave the outer block first.")
    vae.encode, vae.decode = encode, decode
    try:
        yield
    finally:
        del vae.encode, vae.decode


def seam_score(image: torch.Tensor, rows: list[int], cols: list[int]) -> float:
    """Mean absolute jump between neighbouring pixels across the given tile boundaries (row/column indices
    where a new tile starts) minus the mean jump over the whole image: about 0 without seams."""
    jump_y = (image[..., 1:, :] - image[..., :-1, :]).float().abs().mean(dim=(0, 1, 3))
    jump_x = (image[..., :, 1:] - image[..., :, :-1]).float().abs().mean(dim=(0, 1, 2))
    across = torch.cat([jump_y[[row - 1 for row in rows]], jump_x[[col - 1 for col in cols]]])
    return float(across.mean() - torch.cat([jump_y, jump_x]).mean())
