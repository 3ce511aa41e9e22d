"""RAM image tagger and SeeSR's DAPE, for inference: the tag prompt and the 145 x 512 image embeddings.

RAM (Zhang et al., "Recognize Anything: A Strong Image Tagging Model", 2023) as SeeSR (Wu et al., CVPR 2024)
uses it; reference code cswry/SeeSR ``ram/models/ram_lora.py``, ``swin_transformer_lora.py``, ``bert_lora.py``,
``ram/models/utils.py`` and ``test_seesr.py`` (``ram_transforms``, ``get_validation_prompt``). Only the parts
SeeSR runs are built:

* visual encoder: Swin-L 384 (patch 4, window 12, embed 192, depths 2-2-18-2, heads 6-12-24-48) from timm;
  output = the mean of the final (layer-normed) tokens followed by the 12 x 12 tokens, 145 x 1536,
  then ``image_proj`` 1536 -> 512. These are SeeSR's ``image_encoder_hidden_states`` (``generate_image_embeds``).
* tagging head (Query2Label style): ``label_embed`` (one 512-vector per tag) -> ``wordvec_proj`` 512 -> 768 +
  ReLU -> two BERT layers whose word embeddings and self-attention RAM deletes, so each layer is cross-attention
  to the image embeddings (keys/values from 512 wide inputs) + feed-forward -> ``fc`` 768 -> 1 -> sigmoid >
  per-class threshold -> the tag words in tag-list order joined by ", " (SeeSR's ``ram_lora.generate_tag``; RAM's
  own ``ram.py`` joins with " | ", SeeSR's prompt receives ", ").
* DAPE (SeeSR's degradation-aware prompt extractor) = RAM with loralib LoRA (rank 8, ``lora_alpha`` 1, so scale
  1/8) on the Swin ``attn.qkv`` (``MergedLinear``, query and value parts) and the BERT ``query``/``key``.
  ``DAPE.pth`` holds only the ``lora_*`` tensors (SeeSR's ``dape_model.save_network_lora``); SeeSR loads it with
  ``strict=False`` and ``model.eval()`` merges it (loralib). Here the LoRA is merged at load time,
  ``W + scale * B @ A``, so inference runs plain linears; without DAPE the tagger is plain RAM (SeeSR's LoRA
  starts with ``B = 0``).

RAM ties the weights of its (unused) tag encoder's first layers to the tagging head (``tie_encoder_decoder_weights``).
So, as in SeeSR, a tagging-head tensor missing from a file is taken from ``tag_encoder.encoder.layer.<i>``, and a
DAPE LoRA on those tied tag-encoder layers is merged into the tagging head too (it is zero in SeeSR's DAPE.pth,
whose tag-encoder LoRA never receives a gradient). Everything else under :data:`RAM_UNUSED_PREFIXES` (the tag
encoder, the captioning text decoder, ...) is skipped; any other key that matches nothing is an error.

Differences from the reference, on purpose: the Swin is timm's (``layers.<i>.downsample`` sits at the start of
the next stage in timm: the key mapping moves it); attention runs through ``scaled_dot_product_attention``; the
384 px resize is torchvision's bilinear without antialiasing, which is what ``transforms.Resize`` did to tensors
in the torchvision SeeSR pins (0.15, with torch 2.0.1); newer torchvision antialiases by default.
Weights come from local files only: ``torch.load(weights_only=True)`` or safetensors; a release file that needs
pickle is converted once by ``scripts/convert_ram.py --trust_pickle``.
"""

from __future__ import annotations

import pickle
import re
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF
from transformers import BertConfig
from transformers.activations import ACT2FN

from utils.errors import CheckpointError, DataError

RAM_WEIGHTS_NAME = "ram_swin_large_14m.pth"
DAPE_WEIGHTS_NAME = "DAPE.pth"
TAG_LIST_NAME = "ram_tag_list.txt"
THRESHOLD_LIST_NAME = "ram_tag_list_threshold.txt"
DEFAULT_THRESHOLD = 0.68  # RAM's ``threshold`` for classes the threshold file does not list
LORA_ALPHA = 1.0  # loralib's default; SeeSR's lora.Linear / MergedLinear pass none, so scale = 1 / rank
SWIN_QKV_LORA_PARTS = (True, False, True)  # SeeSR's MergedLinear(enable_lora=[True, False, True]): q and v
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Parts of RAM's checkpoint (and of DAPE.pth) that SeeSR never runs: skipped when loading.
RAM_UNUSED_PREFIXES = (
    "tag_encoder.",  # image-tag interaction encoder of the captioning branch (its first layers: see module doc)
    "text_decoder.",  # image-tag-text decoder (captioning)
    "tagging_head.embeddings.",  # deleted by RAM's del_selfattention
    "tagging_head.pooler.",
    "visual_encoder.head.",  # classifier of the Swin, commented out in RAM
)
_UNUSED_PATTERNS = (re.compile(r"^tagging_head\.encoder\.layer\.\d+\.attention\."),)  # deleted self-attention
_DERIVED_BUFFERS = (".relative_position_index", ".attn_mask")  # rebuilt from the config, never loaded
_TIED_TAG_ENCODER = re.compile(r"^tag_encoder\.encoder\.layer\.(\d+)\.((?:crossattention|intermediate|output)\..+)$")


@dataclass
class RAMConfig:
    """Sizes of the tagger; the defaults are RAM Swin-L 384 as SeeSR uses it (``config_swinL_384.json``, ``q2l_config.json``)."""

    image_size: int = 384
    patch_size: int = 4
    embed_dim: int = 192
    depths: tuple[int, ...] = (2, 2, 18, 2)
    num_heads: tuple[int, ...] = (6, 12, 24, 48)
    window_size: int = 12
    mlp_ratio: float = 4.0
    embed_width: int = 512  # image_proj output, label_embed width, the head's encoder_width
    num_tags: int = 4585
    hidden_size: int = 768
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12

    @property
    def vision_width(self) -> int:
        return self.embed_dim * 2 ** (len(self.depths) - 1)

    @property
    def num_tokens(self) -> int:
        """Pooled token + final spatial tokens (145 for Swin-L 384)."""
        side = self.image_size // self.patch_size // 2 ** (len(self.depths) - 1)
        return 1 + side * side

    def bert_config(self) -> BertConfig:
        """The tagging head's configuration as RAM builds it (q2l_config.json with ``encoder_width`` 512)."""
        config = BertConfig(
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size,
            hidden_act=self.hidden_act,
            layer_norm_eps=self.layer_norm_eps,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        config.encoder_width = self.embed_width
        return config


RAM_SWIN_L = RAMConfig()


# ------------------------------------------------------------------------------------------------ tagging head
class CrossAttentionProjections(nn.Module):
    """BERT's query/key/value with keys and values read from ``encoder_width`` wide image embeddings."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.encoder_width, config.hidden_size)
        self.value = nn.Linear(config.encoder_width, config.hidden_size)
        self.attention_dropout = config.attention_probs_dropout_prob  # 0 for inference; DAPE training sets BERT's 0.1

    def forward(self, hidden: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        def heads(x):
            return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

        dropout = self.attention_dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(heads(self.query(hidden)), heads(self.key(context)), heads(self.value(context)),
                                             dropout_p=dropout)
        return out.transpose(1, 2).flatten(2)


class ResidualOutput(nn.Module):
    """BERT's ``dense -> + residual -> LayerNorm`` (BertSelfOutput / BertOutput)."""

    def __init__(self, in_features: int, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(in_features, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)  # p = 0 for inference; DAPE training sets BERT's 0.1

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden)) + residual)


class CrossAttention(nn.Module):
    """BERT's cross-attention block; the submodule is called ``self`` as in BERT's checkpoints."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.self = CrossAttentionProjections(config)
        self.output = ResidualOutput(config.hidden_size, config)

    def forward(self, hidden: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(hidden, context), hidden)


class Intermediate(nn.Module):
    """BERT's feed-forward expansion."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(hidden))


class TaggingLayer(nn.Module):
    """One layer of RAM's tagging head: cross-attention to the image (no self-attention), then feed-forward."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.crossattention = CrossAttention(config)
        self.intermediate = Intermediate(config)
        self.output = ResidualOutput(config.intermediate_size, config)

    def forward(self, hidden: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        hidden = self.crossattention(hidden, context)
        return self.output(self.intermediate(hidden), hidden)


class TaggingEncoder(nn.Module):
    """The layer stack, under ``encoder.layer.<i>`` as in RAM's ``tagging_head`` keys."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(TaggingLayer(config) for _ in range(config.num_hidden_layers))


class TaggingHead(nn.Module):
    """RAM's ``tagging_head``: label queries attend to the image embeddings."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.encoder = TaggingEncoder(config)

    def forward(self, queries: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        for layer in self.encoder.layer:
            queries = layer(queries, image_embeds)
        return queries


# ------------------------------------------------------------------------------------------------ the tagger
def build_swin(config: RAMConfig) -> nn.Module:
    """timm's Swin Transformer with RAM's visual-encoder sizes (no classifier, no drop path at inference)."""
    from timm.models.swin_transformer import SwinTransformer

    return SwinTransformer(
        img_size=config.image_size,
        patch_size=config.patch_size,
        num_classes=0,
        global_pool="",
        embed_dim=config.embed_dim,
        depths=tuple(config.depths),
        num_heads=tuple(config.num_heads),
        window_size=config.window_size,
        mlp_ratio=config.mlp_ratio,
        qkv_bias=True,
        drop_path_rate=0.0,
    )


class RAMTagger(nn.Module):
    """RAM (or DAPE, LoRA merged) for SeeSR: tag prompts and image embeddings from [0, 1] images."""

    def __init__(self, config: RAMConfig, tag_list: list[str], class_threshold: torch.Tensor | None = None):
        super().__init__()
        if len(tag_list) != config.num_tags:
            raise DataError(f"The tag list has {len(tag_list)} tags but the tagger has {config.num_tags} classes.")
        self.config = config
        self.tag_list = list(tag_list)
        bert = config.bert_config()
        self.visual_encoder = build_swin(config)
        self.image_proj = nn.Linear(config.vision_width, config.embed_width)
        self.label_embed = nn.Parameter(torch.zeros(config.num_tags, config.embed_width))
        self.wordvec_proj = nn.Linear(config.embed_width, config.hidden_size)
        self.tagging_head = TaggingHead(bert)
        self.fc = nn.Linear(config.hidden_size, 1)
        if class_threshold is None:
            class_threshold = torch.full((config.num_tags,), DEFAULT_THRESHOLD)
        # a plain attribute, not a buffer: a cast of the module to fp16 must not round the thresholds
        self.class_threshold = class_threshold.float().clone()

    @property
    def device(self) -> torch.device:
        return self.image_proj.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.image_proj.weight.dtype

    def preprocess(self, images01: torch.Tensor, resize: str = "bilinear") -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> [B, 3, 384, 384], ImageNet-normalised.

        ``resize="bilinear"``: SeeSR's inference ``ram_transforms`` (``test_seesr.py``; torchvision bilinear, no
        antialiasing). ``"bicubic"``: SeeSR's training data (``dataloaders/paired_dataset.py``: ``F.interpolate``
        bicubic, clamped to [0, 1]), for the RAM embeddings of the LR input while training.
        """
        if images01.ndim != 4 or images01.shape[1] != 3:
            raise ValueError(f"RAMTagger expects images [B, 3, H, W] in [0, 1], got shape {tuple(images01.shape)}.")
        size = [self.config.image_size, self.config.image_size]
        x = images01.to(self.device, torch.float32)
        if resize == "bilinear":
            x = TF.resize(x, size, interpolation=InterpolationMode.BILINEAR, antialias=False)
        elif resize == "bicubic":
            x = F.interpolate(x, size=size, mode="bicubic").clamp(0.0, 1.0)
        else:
            raise ValueError(f"resize must be 'bilinear' (SeeSR inference) or 'bicubic' (SeeSR training), got {resize!r}.")
        x = TF.normalize(x, IMAGENET_MEAN, IMAGENET_STD)
        return x.to(self.dtype)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed pixels -> image embeddings [B, 145, 512] (pooled token first, then the 12 x 12 tokens)."""
        tokens = self.visual_encoder.forward_features(pixels).flatten(1, 2)  # timm: layer-normed, NHWC
        tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)
        return self.image_proj(tokens)

    def logits(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """Image embeddings -> tag logits [B, num_tags] (float32)."""
        queries = F.relu(self.wordvec_proj(self.label_embed)).unsqueeze(0).expand(image_embeds.shape[0], -1, -1)
        return self.fc(self.tagging_head(queries, image_embeds)).squeeze(-1).float()

    def tags_from_logits(self, logits: torch.Tensor) -> list[str]:
        """sigmoid(logits) > per-class threshold -> the tag words in tag-list order joined by ", " (one string per image)."""
        fired = torch.sigmoid(logits.float()) > self.class_threshold.to(logits.device)
        return [", ".join(self.tag_list[i] for i in row.nonzero().flatten().tolist()) for row in fired.cpu()]

    @torch.no_grad()
    def image_embeddings(self, images01: torch.Tensor, resize: str = "bilinear") -> torch.Tensor:
        """SeeSR's ``generate_image_embeds``: [B, 3, H, W] in [0, 1] -> [B, 145, 512] (``resize``: see :meth:`preprocess`)."""
        return self.encode(self.preprocess(images01, resize))

    @torch.no_grad()
    def tags(self, images01: torch.Tensor) -> list[str]:
        """SeeSR's ``inference_ram``: the tag string of each image."""
        return self.tags_from_logits(self.logits(self.image_embeddings(images01)))

    @torch.no_grad()
    def forward(self, images01: torch.Tensor) -> tuple[list[str], torch.Tensor]:
        """(tag strings, image embeddings [B, 145, 512]) with one pass through the Swin."""
        embeds = self.image_embeddings(images01)
        return self.tags_from_logits(self.logits(embeds)), embeds


# ------------------------------------------------------------------------------------------------ files
def read_tag_list(path: str | Path) -> list[str]:
    """One tag per line (RAM's ``load_tag_list``: ``read().splitlines()``)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"RAM tag list {path} does not exist; expected {TAG_LIST_NAME} (one tag per line, 4585 lines, shipped in "
            "RAM's and SeeSR's ram/data/) there: put it beside the RAM weights or give its path."
        )
    return path.read_text(encoding="utf-8").splitlines()


def read_class_thresholds(path: str | Path, num_tags: int) -> torch.Tensor:
    """Per-class thresholds: line i is tag i's; classes past the end of the file keep RAM's default 0.68."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"RAM threshold file {path} does not exist; expected {THRESHOLD_LIST_NAME} (one number per tag) there.")
    lines = path.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if len(lines) > num_tags:
        raise DataError(
            f"RAM threshold file {path} has {len(lines)} lines but the tag list has {num_tags} tags; use the file that came with it."
        )
    thresholds = torch.full((num_tags,), DEFAULT_THRESHOLD)
    for i, line in enumerate(lines):
        try:
            thresholds[i] = float(line)
        except ValueError:
            raise DataError(f"RAM threshold file {path}, line {i + 1}: {line!r} is not a number.") from None
    return thresholds


def read_weights(path: str | Path, what: str, expected_name: str) -> dict[str, torch.Tensor]:
    """A flat state dict from ``path``: safetensors, or ``torch.load(weights_only=True)`` unwrapping ``{'model': ...}``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} weights {path} do not exist; expected {expected_name} there (give its path).")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        try:  # mmap: RAM's release also carries optimizer state that is never read
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # files from torch < 1.6 cannot be memory-mapped
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path} holds pickled Python objects besides tensors, so it was not read (unpickling can run code); if you "
            f"trust its source, convert it once: python scripts/convert_ram.py {path} <out>.safetensors --trust_pickle"
        ) from None
    except Exception as err:
        raise CheckpointError(f"{path} is not a readable torch checkpoint ({type(err).__name__}: {str(err).splitlines()[0]}).") from None
    for key in ("model", "state_dict", "params"):  # RAM: {'model': ...}; basicsr: {'params': ...}
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} is not a state dict of tensors; expected {what}'s {expected_name}.")
    return dict(obj)


# ------------------------------------------------------------------------------------------------ key mapping
def _is_unused(key: str) -> bool:
    return key.startswith(RAM_UNUSED_PREFIXES) or any(p.match(key) for p in _UNUSED_PATTERNS) or key.endswith(_DERIVED_BUFFERS)


def _tied_head_key(key: str, num_head_layers: int) -> str | None:
    """``tag_encoder.encoder.layer.<i>.X`` -> ``tagging_head.encoder.layer.<i>.X`` for the layers RAM ties, else None."""
    match = _TIED_TAG_ENCODER.match(key)
    if match and int(match.group(1)) < num_head_layers:
        return f"tagging_head.encoder.layer.{match.group(1)}.{match.group(2)}"
    return None


def resolve_ram_keys(state_dict: dict[str, torch.Tensor], num_head_layers: int) -> dict[str, torch.Tensor]:
    """The RAM-layout tensors SeeSR's model ends up with: ``vision_multi`` renamed, tied layers filled, unused parts dropped."""
    state = {k.replace("vision_multi", "tagging_head"): v for k, v in state_dict.items()}
    for key, value in list(state.items()):
        head_key = _tied_head_key(key, num_head_layers)
        if head_key is not None and head_key not in state:  # RAM loads tag_encoder, then tagging_head over it
            state[head_key] = value
    return {k: v for k, v in state.items() if not _is_unused(k)}


def ram_to_timm_key(key: str) -> str:
    """RAM's Swin (downsample at the end of stage i) -> timm's (downsample at the start of stage i + 1)."""
    return re.sub(
        r"^visual_encoder\.layers\.(\d+)\.downsample\.", lambda m: f"visual_encoder.layers.{int(m.group(1)) + 1}.downsample.", key
    )


def lora_delta(weight_key: str, lora_a: torch.Tensor, lora_b: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """loralib's ``scale * B @ A`` for a Linear, or the zero-padded per-part product of SeeSR's Swin qkv MergedLinear."""
    a, b = lora_a.float(), lora_b.float()
    rank = b.shape[1]
    scale = LORA_ALPHA / rank
    if weight_key.endswith("attn.qkv.weight"):
        parts = SWIN_QKV_LORA_PARTS
        out = weight.shape[0] // len(parts)
        enabled = [i for i, on in enumerate(parts) if on]
        if a.shape != (rank * len(enabled), weight.shape[1]) or b.shape[0] != out * len(enabled):
            raise CheckpointError(
                f"LoRA of {weight_key} has shapes {tuple(a.shape)}/{tuple(b.shape)}, which do not fit {tuple(weight.shape)}."
            )
        delta = torch.zeros_like(weight, dtype=torch.float32)
        for group, part in enumerate(enabled):
            delta[part * out : (part + 1) * out] = b[group * out : (group + 1) * out] @ a[group * rank : (group + 1) * rank]
        return delta * scale
    if a.shape[1] != weight.shape[1] or b.shape[0] != weight.shape[0] or a.shape[0] != rank:
        raise CheckpointError(f"LoRA of {weight_key} has shapes {tuple(a.shape)}/{tuple(b.shape)}, which do not fit {tuple(weight.shape)}.")
    return (b @ a) * scale


def apply_dape(state: dict[str, torch.Tensor], dape: dict[str, torch.Tensor], num_head_layers: int, source: str) -> dict[str, torch.Tensor]:
    """RAM-layout ``state`` with DAPE's plain tensors loaded over it and its LoRA merged in (SeeSR's strict=False + eval())."""
    state = dict(state)
    plain = {k: v for k, v in dape.items() if ".lora_" not in k}
    for key, value in resolve_ram_keys(plain, num_head_layers).items():
        if key not in state:
            raise CheckpointError(f"{source} has a tensor {key} that matches no part of RAM; is it SeeSR's DAPE.pth?")
        state[key] = value
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in dape if ".lora_" in k})
    for module in modules:
        lora_a, lora_b = dape.get(f"{module}.lora_A"), dape.get(f"{module}.lora_B")
        if lora_a is None or lora_b is None:
            raise CheckpointError(f"{source} has only one of {module}.lora_A / lora_B; the file is incomplete.")
        targets = [module] if not _is_unused(module + ".weight") else []
        tied = _tied_head_key(module, num_head_layers)
        if tied is not None:
            targets.append(tied)  # the tied tag-encoder layer merges into the shared (tagging-head) weight
        if not targets:
            continue  # LoRA of the unused tag encoder / text decoder
        for target in targets:
            weight_key = f"{target}.weight"
            if weight_key not in state:
                raise CheckpointError(
                    f"{source} has LoRA tensors for {module}, which matches no linear layer of RAM; is it SeeSR's DAPE.pth?"
                )
            weight = state[weight_key]
            state[weight_key] = (weight.float() + lora_delta(weight_key, lora_a, lora_b, weight)).to(weight.dtype)
    return state


def load_tagger_state(model: RAMTagger, state: dict[str, torch.Tensor], source: str) -> None:
    """Load resolved RAM-layout tensors into ``model`` strictly (every parameter from the file, nothing left over)."""
    mapped = {ram_to_timm_key(k): v for k, v in state.items()}
    expected = model.state_dict()
    for key in expected:  # buffers rebuilt from the config (persistent in some timm versions)
        if key.endswith(_DERIVED_BUFFERS):
            mapped[key] = expected[key]
    missing = sorted(set(expected) - set(mapped))
    unexpected = sorted(set(mapped) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unknown (e.g. {', '.join(unexpected[:3])})")
        raise CheckpointError(
            f"{source} does not fit RAM Swin-L as SeeSR uses it: {'; '.join(parts)} tensors; expected RAM's {RAM_WEIGHTS_NAME}."
        )
    wrong = [k for k, v in mapped.items() if v.shape != expected[k].shape]
    if wrong:
        k = wrong[0]
        raise CheckpointError(
            f"{source} does not fit the tagger: {k} has shape {tuple(mapped[k].shape)}, expected {tuple(expected[k].shape)} "
            f"({len(wrong)} tensors differ); expected RAM's {RAM_WEIGHTS_NAME} (Swin-L 384) and its tag list."
        )
    model.load_state_dict(mapped, strict=True)


SEESR_RAM_DATA = Path("ram") / "data"  # where SeeSR's (and RAM's) code tree keeps the tag lists


def _find_beside(name: str, *files: str | Path | None) -> Path:
    """``name`` beside the first given file that has it, else in SeeSR's ``ram/data/`` under the current folder
    (where test_seesr.py finds it), else the path beside the first file (for the error message)."""
    folders = [Path(f).parent for f in files if f is not None]
    for folder in [*folders, SEESR_RAM_DATA]:
        if (folder / name).is_file():
            return folder / name
    return folders[0] / name


def load_ram_tagger(
    ram_path: str | Path,
    dape_path: str | Path | None = None,
    tag_list_path: str | Path | None = None,
    threshold_path: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    config: RAMConfig | None = None,
) -> RAMTagger:
    """RAM from ``ram_swin_large_14m.pth`` (+ SeeSR's ``DAPE.pth`` merged in), ready for inference.

    The tag list (``ram_tag_list.txt``) and the thresholds (``ram_tag_list_threshold.txt``) are read from the given
    paths, else from beside the RAM weights (or DAPE), else from ``ram/data/`` under the current folder (SeeSR's code
    tree). Without a threshold file every class uses RAM's 0.68 (with
    a warning: SeeSR always reads the file). ``config`` defaults to RAM Swin-L 384; tests pass a tiny one.
    """
    config = config or RAM_SWIN_L
    ram_path = Path(ram_path)
    if not ram_path.is_file():
        raise CheckpointError(f"RAM weights {ram_path} do not exist; expected RAM's {RAM_WEIGHTS_NAME} there (give its path).")
    if dape_path is not None and not Path(dape_path).is_file():
        raise CheckpointError(f"DAPE weights {dape_path} do not exist; expected SeeSR's {DAPE_WEIGHTS_NAME} there (give its path).")
    tag_list = read_tag_list(tag_list_path or _find_beside(TAG_LIST_NAME, ram_path, dape_path))
    config = RAMConfig(**{**asdict(config), "num_tags": len(tag_list)})
    if threshold_path is None:
        candidate = _find_beside(THRESHOLD_LIST_NAME, tag_list_path, ram_path, dape_path)
        threshold_path = candidate if candidate.is_file() else None
    if threshold_path is None:
        warnings.warn(
            f"No {THRESHOLD_LIST_NAME} beside {ram_path}: every tag uses RAM's default threshold {DEFAULT_THRESHOLD} "
            "(SeeSR reads the per-class file that ships in RAM's ram/data/).",
            stacklevel=2,
        )
        thresholds = None
    else:
        thresholds = read_class_thresholds(threshold_path, len(tag_list))
    state = resolve_ram_keys(read_weights(ram_path, "RAM", RAM_WEIGHTS_NAME), config.num_hidden_layers)
    classes = state.get("label_embed")
    if classes is not None and classes.shape[0] != len(tag_list):
        raise DataError(
            f"The tag list has {len(tag_list)} tags but the RAM weights {ram_path} have {classes.shape[0]} classes; "
            f"use the {TAG_LIST_NAME} that ships with RAM/SeeSR."
        )
    if dape_path is not None:
        dape = read_weights(dape_path, "DAPE", DAPE_WEIGHTS_NAME)
        state = apply_dape(state, dape, config.num_hidden_layers, str(dape_path))
    model = RAMTagger(config, tag_list, thresholds)
    load_tagger_state(model, state, str(ram_path))
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
