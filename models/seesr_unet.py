"""SeeSR's image cross-attention in the SD2 UNet and its ControlNet, on current diffusers.

SeeSR (Wu et al., CVPR 2024, https://github.com/cswry/SeeSR, ``models/unet_2d_blocks.py``,
``models/unet_2d_condition.py``, ``models/controlnet.py``) copies diffusers 0.21's UNet, ControlNet and block files
to add one thing: every cross-attention block (``CrossAttnDownBlock2D``, ``UNetMidBlock2DCrossAttn``,
``CrossAttnUpBlock2D``) gets a second list ``image_attentions`` with one ``Transformer2DModel`` per entry of
``attentions`` (same heads, width, layers, norm groups and projection type; ``cross_attention_dim`` 512, the width
of the RAM image embeddings), run right after the text attention::

    resnet -> attentions[i](encoder_hidden_states) -> image_attentions[i](image_encoder_hidden_states)

(mid block: text attention -> image attention -> resnet). The configs carry ``use_image_cross_attention: true``
and the forward methods take ``image_encoder_hidden_states`` (``[B, 145, 512]``: RAM's pooled token and 12 x 12
spatial tokens after its ``image_proj``).

How it is built here: instead of copying diffusers' files, :class:`SeeSRUNet2DConditionModel` and
:class:`SeeSRControlNetModel` subclass diffusers' ``UNet2DConditionModel`` and ``ControlNetModel`` (so
``save_pretrained``/``from_pretrained``, safetensors, attention processors and gradient checkpointing come from
diffusers) and, after the parent has built the blocks, give each cross-attention block its ``image_attentions``
list (so the parameter names are SeeSR's: ``down_blocks.1.image_attentions.0.proj_in.weight``, ...) and put a
forward hook on each text attention that runs the matching image attention on its output. The hook reads the
embeddings the model's ``forward`` stores for the duration of the call; with ``image_encoder_hidden_states=None``
the hook does nothing and the model computes exactly what diffusers' plain model computes, so one class serves
SeeSR's weights and plain SD2/ControlNet weights. (SeeSR's own code would instead run the image attention as
self-attention when given no embeddings; no SeeSR path does that.) The image attention gets the text attention's
``cross_attention_kwargs`` and ``attention_mask`` as in SeeSR, not the text's ``encoder_attention_mask`` (it masks
77 text tokens, not 145 image tokens; SeeSR passes it, always None there).

Config keys: ``use_image_cross_attention`` (SeeSR's) and ``image_cross_attention_dim`` (ours, default 512 as
SeeSR's block default, so SeeSR's configs load unchanged). SeeSR's configs otherwise hold diffusers-0.21 keys
only (``_class_name`` ``UNet2DConditionModel``/``ControlNetModel``, no ``mid_block_type``, ``dropout``, ...): the
keys diffusers added since take their defaults, which are SD2's.

Initialisation of new image attentions (:func:`unet_with_image_attention`): SeeSR's ``train_seesr.py`` builds its
UNet from SD2's weights with ``use_image_cross_attention=True``, so the image attentions keep the constructor's
PyTorch default initialisation (they are not zero-initialised: the new UNet is not SD2's function at step 0), and
``ControlNetModel.from_unet`` then copies the UNet's encoder, image attentions included, into the ControlNet.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
from diffusers import ControlNetModel, Transformer2DModel, UNet2DConditionModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.unets.unet_2d_blocks import CrossAttnDownBlock2D, CrossAttnUpBlock2D, UNetMidBlock2DCrossAttn
from torch import nn

from utils.errors import CheckpointError

IMAGE_ATTENTIONS = "image_attentions"
RAM_EMBEDDING_DIM = 512  # RAM's image_proj output width: the image tokens' width in SeeSR
IMAGE_ATTENTION_BLOCKS = (CrossAttnDownBlock2D, UNetMidBlock2DCrossAttn, CrossAttnUpBlock2D)


class _ImageStates:
    """The image embeddings of the forward call in progress (None outside a call or when there are none)."""

    value: torch.Tensor | None = None


class _RunImageAttention:
    """Forward hook on a text attention: run its image attention on the text attention's output."""

    def __init__(self, states: _ImageStates, image_attention: nn.Module):
        self.states = states
        self.image_attention = image_attention

    def __call__(self, module, args, kwargs, output):
        if self.states.value is None:
            return None  # output unchanged: the plain model
        hidden_states = output[0] if isinstance(output, tuple) else output.sample
        hidden_states = self.image_attention(
            hidden_states,
            encoder_hidden_states=self.states.value,
            cross_attention_kwargs=kwargs.get("cross_attention_kwargs"),
            attention_mask=kwargs.get("attention_mask"),
            return_dict=False,
        )[0]
        if isinstance(output, tuple):
            return (hidden_states,) + tuple(output[1:])
        return Transformer2DModelOutput(sample=hidden_states)


def image_attention_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks of a UNet or ControlNet that get image attention in SeeSR (its cross-attention blocks), in order."""
    blocks = list(getattr(model, "down_blocks", [])) + [getattr(model, "mid_block", None)]
    blocks += list(getattr(model, "up_blocks", []))
    return [block for block in blocks if isinstance(block, IMAGE_ATTENTION_BLOCKS)]


def _add_image_attentions(model: nn.Module, cross_attention_dim: int) -> _ImageStates:
    """Give each cross-attention block an ``image_attentions`` twin of its ``attentions`` and hook them in."""
    states = _ImageStates()
    for block in image_attention_blocks(model):
        image_attentions = []
        for attention in block.attentions:
            if not isinstance(attention, Transformer2DModel):
                raise ValueError(f"SeeSR's image attention needs Transformer2DModel attentions, found {type(attention)}.")
            config = {key: value for key, value in attention.config.items() if not key.startswith("_")}
            image_attentions.append(Transformer2DModel(**{**config, "cross_attention_dim": cross_attention_dim}))
        block.image_attentions = nn.ModuleList(image_attentions)
        for attention, image_attention in zip(block.attentions, block.image_attentions):
            attention.register_forward_hook(_RunImageAttention(states, image_attention), with_kwargs=True)
    return states


def _extends_signature(parent_init):
    """Give ``init`` the signature of ``parent_init`` plus its own keyword-only parameters.

    diffusers reads a model's config keys from its ``__init__`` signature (``from_config``, ``register_to_config``),
    so the subclasses' ``(*args, extra=..., **kwargs)`` must look like the parent's full parameter list.
    """

    def decorate(init):
        parent = inspect.signature(parent_init)
        own = [p for p in inspect.signature(init).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]
        init.__signature__ = parent.replace(parameters=list(parent.parameters.values()) + own)
        return init

    return decorate


class _ImageCrossAttentionMixin:
    """What the UNet and the ControlNet share: building the image attentions and the forward-time checks."""

    def _init_image_attentions(self, enabled: bool, image_cross_attention_dim: int) -> None:
        self._image_states = _ImageStates()
        if enabled:
            self._image_states = _add_image_attentions(self, image_cross_attention_dim)

    def _check_image_states(self, image_encoder_hidden_states, sample):
        if image_encoder_hidden_states is None:
            return
        if not self.config.use_image_cross_attention:
            raise ValueError(
                f"{type(self).__name__} was built without image cross-attention (use_image_cross_attention false); "
                "pass image_encoder_hidden_states=None."
            )
        if image_encoder_hidden_states.ndim != 3 or image_encoder_hidden_states.shape[0] != sample.shape[0]:
            raise ValueError(
                f"Expected image_encoder_hidden_states [{sample.shape[0]}, tokens, "
                f"{self.config.image_cross_attention_dim}], found {tuple(image_encoder_hidden_states.shape)}."
            )

    def _forward_with_images(self, parent_forward, image_encoder_hidden_states, sample, *args, **kwargs):
        self._check_image_states(image_encoder_hidden_states, sample)
        self._image_states.value = image_encoder_hidden_states
        try:
            return parent_forward(self, sample, *args, **kwargs)
        finally:
            self._image_states.value = None


class SeeSRUNet2DConditionModel(_ImageCrossAttentionMixin, UNet2DConditionModel):
    """diffusers' ``UNet2DConditionModel`` with SeeSR's optional image cross-attention (config key
    ``use_image_cross_attention``); ``forward(..., image_encoder_hidden_states=None)``."""

    @register_to_config
    @_extends_signature(UNet2DConditionModel.__init__)
    def __init__(
        self, *args, use_image_cross_attention: bool = False, image_cross_attention_dim: int = RAM_EMBEDDING_DIM,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self._init_image_attentions(use_image_cross_attention, image_cross_attention_dim)

    def forward(self, sample, timestep, encoder_hidden_states, *args, image_encoder_hidden_states=None, **kwargs):
        return self._forward_with_images(
            UNet2DConditionModel.forward, image_encoder_hidden_states, sample, timestep, encoder_hidden_states,
            *args, **kwargs,
        )


class SeeSRControlNetModel(_ImageCrossAttentionMixin, ControlNetModel):
    """diffusers' ``ControlNetModel`` with SeeSR's optional image cross-attention in its down and mid blocks;
    ``forward(..., image_encoder_hidden_states=None)``."""

    @register_to_config
    @_extends_signature(ControlNetModel.__init__)
    def __init__(
        self, *args, use_image_cross_attention: bool = False, image_cross_attention_dim: int = RAM_EMBEDDING_DIM,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self._init_image_attentions(use_image_cross_attention, image_cross_attention_dim)

    def forward(
        self, sample, timestep, encoder_hidden_states, controlnet_cond, *args, image_encoder_hidden_states=None,
        vae_encode_condition_hidden_states=None, **kwargs,
    ):
        # vae_encode_condition_hidden_states: in SeeSR's signature, unused there too.
        return self._forward_with_images(
            ControlNetModel.forward, image_encoder_hidden_states, sample, timestep, encoder_hidden_states,
            controlnet_cond, *args, **kwargs,
        )

    @classmethod
    def from_unet(
        cls,
        unet: UNet2DConditionModel,
        controlnet_conditioning_channel_order: str = "rgb",
        conditioning_embedding_out_channels: tuple[int, ...] | None = (16, 32, 96, 256),
        load_weights_from_unet: bool = True,
        conditioning_channels: int = 3,
        use_image_cross_attention: bool | None = None,
    ) -> SeeSRControlNetModel:
        """diffusers' ``ControlNetModel.from_unet`` (config and encoder weights from ``unet``) with image attention.

        ``use_image_cross_attention=None`` follows the UNet. The image attentions are copied from the UNet when it
        has them (SeeSR's ``from_unet``); otherwise they keep their fresh initialisation.
        """
        unet_has_images = bool(getattr(unet.config, "use_image_cross_attention", False))
        if use_image_cross_attention is None:
            use_image_cross_attention = unet_has_images
        image_dim = getattr(unet.config, "image_cross_attention_dim", RAM_EMBEDDING_DIM)

        def build(**config):
            return cls(
                **config, use_image_cross_attention=use_image_cross_attention, image_cross_attention_dim=image_dim
            )

        # diffusers' from_unet only calls its class to construct: let it fill the config, then copy the weights here.
        controlnet = ControlNetModel.from_unet.__func__(
            build, unet, controlnet_conditioning_channel_order, conditioning_embedding_out_channels,
            load_weights_from_unet=False, conditioning_channels=conditioning_channels,
        )
        if load_weights_from_unet:
            for name in ("conv_in", "time_proj", "time_embedding", "class_embedding", "add_embedding"):
                source = getattr(unet, name, None)
                if getattr(controlnet, name, None) is not None and source is not None:
                    getattr(controlnet, name).load_state_dict(source.state_dict())
            for name in ("down_blocks", "mid_block"):
                _load_allowing_new_image_attentions(getattr(controlnet, name), getattr(unet, name).state_dict())
        return controlnet


def _load_allowing_new_image_attentions(module: nn.Module, state_dict: dict) -> None:
    """``load_state_dict`` that lets image-attention weights be missing (they stay new) and nothing else."""
    own = module.state_dict()
    extra = [key for key in state_dict if key not in own]
    if extra and any(IMAGE_ATTENTIONS not in key for key in extra):
        raise ValueError(f"Unexpected weights {extra[:3]} when copying into {type(module).__name__}.")
    result = module.load_state_dict({key: value for key, value in state_dict.items() if key in own}, strict=False)
    missing = [key for key in result.missing_keys if IMAGE_ATTENTIONS not in key]
    if missing:
        raise ValueError(f"Missing weights {missing[:3]} when copying into {type(module).__name__}.")


def unet_with_image_attention(
    unet: UNet2DConditionModel, image_cross_attention_dim: int = RAM_EMBEDDING_DIM
) -> SeeSRUNet2DConditionModel:
    """A SeeSR UNet with image attention holding ``unet``'s weights (SD2's, say); new image attentions keep the
    constructor's PyTorch default initialisation, as in SeeSR's ``train_seesr.py`` (call ``torch.manual_seed`` first
    for a reproducible one). A UNet that already has image attention is returned as it is."""
    if getattr(unet.config, "use_image_cross_attention", False):
        return unet
    config = {key: value for key, value in unet.config.items() if not key.startswith("_")}
    config.update(use_image_cross_attention=True, image_cross_attention_dim=image_cross_attention_dim)
    parameter = next(unet.parameters())
    model = SeeSRUNet2DConditionModel.from_config(config).to(device=parameter.device)
    if parameter.dtype != model.dtype:  # diffusers warns on every .to(dtype=...), even a no-op one
        model.to(dtype=parameter.dtype)
    _load_allowing_new_image_attentions(model, unet.state_dict())
    model.train(unet.training)
    return model


def unet_trainable_parameters(
    unet: nn.Module, trainable_modules: tuple[str, ...] | list[str] = (IMAGE_ATTENTIONS,)
) -> dict[str, nn.Parameter]:
    """The parameters of the UNet modules whose name ends with any of ``trainable_modules``, and everything inside
    them (SeeSR's ``--trainable_modules``: ``name.endswith(tuple(args.trainable_modules))`` over ``named_modules``)."""
    suffixes = tuple(trainable_modules)
    chosen = {}
    for module_name, module in unet.named_modules():
        if module_name.endswith(suffixes):
            prefix = f"{module_name}." if module_name else ""
            for name, parameter in module.named_parameters():
                chosen[prefix + name] = parameter
    return chosen


def load_strict(model_class: type, folder: str | Path, torch_dtype: torch.dtype | None = None) -> nn.Module:
    """``model_class.from_pretrained(folder)`` that refuses missing, unexpected or mis-shaped weights (one line)."""
    folder = Path(folder)
    # SeeSR's release ships .bin only (diffusers reads it with torch.load(weights_only=True)); say so up front
    # instead of letting diffusers log a failed safetensors look-up.
    use_safetensors = (folder / "diffusion_pytorch_model.safetensors").is_file() or None
    if use_safetensors is None and (folder / "diffusion_pytorch_model.bin").is_file():
        use_safetensors = False
    try:
        model, info = model_class.from_pretrained(
            folder, output_loading_info=True, torch_dtype=torch_dtype, use_safetensors=use_safetensors
        )
    except (OSError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"Cannot load the model in {folder}: {str(error).strip().splitlines()[0]}") from None
    problems = []
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = [key if isinstance(key, str) else key[0] for key in info.get(kind) or []]
        if keys:
            problems.append(f"{len(keys)} {kind.replace('_', ' ')} (e.g. {sorted(keys)[0]})")
    if problems:
        raise CheckpointError(
            f"The weights in {folder} do not match its config.json: {'; '.join(problems)}; pass a folder written "
            "by save_pretrained of the same model."
        )
    return model
