"""LightningDiT: a diffusion transformer on VA-VAE latents, here with the user ID as its class label.

Papers: Peebles & Xie, "Scalable Diffusion Models with Transformers" (DiT, 2023); Ma et al., "SiT" (2024);
Yao et al., "Reconstruction vs. Generation" (VA-VAE + LightningDiT, 2025). Reference code:
hustvl/LightningDiT ``models/lightningdit.py`` (with ``rmsnorm.py``, ``swiglu_ffn.py``, ``pos_embed.py``),
itself built on facebookresearch/DiT and willisma/SiT.

Written anew, with the reference's module and parameter names, so a LightningDiT state dict loads
strictly and, with equal weights, :class:`LightningDiT` computes what the reference computes:
patch embedding plus fixed 2D sin-cos positions, adaLN-Zero blocks (optionally without the shift terms),
RMSNorm, SwiGLU, 2D rotary position embedding (EVA-02 style, interleaved pairs), optional QK-norm and
PyTorch's scaled-dot-product attention. Time ``t`` runs over [0, 1] (0 = noise, 1 = data) and is embedded
as is, like SiT. The label table has ``num_classes + 1`` rows when ``class_dropout_prob > 0``; the last row
is the null label used for classifier-free guidance (here: the null user, index ``num_users``).

:func:`load_lightningdit_init` starts a user model from a released LightningDiT checkpoint: every tensor is copied;
of the ImageNet class table (1001 rows) only the trained null row 1000 is, into the null user's row ``num_users``
(the user rows are new). :func:`release_uses_qknorm` reads the release's QK-norm setting so the model can keep it.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from torch.utils.checkpoint import checkpoint

from utils.errors import CheckpointError, UserError


def modulate(x: torch.Tensor, shift: torch.Tensor | None, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation of token features ``x`` (B,N,D) by per-sample ``shift``/``scale`` (B,D)."""
    if shift is None:
        return x * (1 + scale.unsqueeze(1))
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learnable gain, computed in float32 (LLaMA's, as LightningDiT uses it)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_float = x.float()
        normed = x_float * torch.rsqrt(x_float.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class SwiGLUFFN(nn.Module):
    """SwiGLU feed-forward: ``w3(silu(a) * b)`` with ``a, b`` the two halves of ``w12(x)``."""

    def __init__(self, in_features: int, hidden_features: int):
        super().__init__()
        self.w12 = nn.Linear(in_features, 2 * hidden_features)
        self.w3 = nn.Linear(hidden_features, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


class Mlp(nn.Module):
    """The GELU(tanh) MLP of DiT (timm's ``Mlp`` names: ``fc1``, ``fc2``)."""

    def __init__(self, in_features: int, hidden_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch_size`` patches -> tokens (timm's ``PatchEmbed`` with a ``proj`` convolution)."""

    def __init__(self, input_size: int, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.input_size = input_size
        self.patch_size = patch_size
        self.grid_size = input_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(f"LightningDiT was built for {self.input_size}x{self.input_size} latents, got {tuple(x.shape[-2:])}.")
        return self.proj(x).flatten(2).transpose(1, 2)


def rotate_half_interleaved(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): the rotation partner of each interleaved pair."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


class VisionRotaryEmbedding2D(nn.Module):
    """2D RoPE over a square token grid (EVA-02's ``VisionRotaryEmbeddingFast``).

    The first half of each head's channels rotates with the token's row, the second half with its column;
    ``dim`` is half the head dimension. The cos/sin tables are persistent buffers, as in the reference, so
    they appear in (and load from) LightningDiT state dicts.
    """

    def __init__(self, dim: int, grid_size: int, theta: float = 10000.0):
        super().__init__()
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
        # Same float expression as the reference (positions / L * L), so the tables match bit for bit.
        positions = torch.arange(grid_size) / grid_size * grid_size
        angles = torch.einsum("i,f->if", positions, freqs).repeat_interleave(2, dim=-1)  # (L, dim)
        rows = angles[:, None, :].expand(grid_size, grid_size, dim)
        cols = angles[None, :, :].expand(grid_size, grid_size, dim)
        table = torch.cat((rows, cols), dim=-1).reshape(grid_size * grid_size, 2 * dim)
        self.register_buffer("freqs_cos", table.cos())
        self.register_buffer("freqs_sin", table.sin())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.freqs_cos + rotate_half_interleaved(x) * self.freqs_sin


class Attention(nn.Module):
    """Multi-head self-attention with optional QK-norm and RoPE, computed by scaled-dot-product attention."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, qk_norm: bool = False, use_rmsnorm: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size {dim} is not divisible by num_heads {num_heads}.")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        norm = RMSNorm if use_rmsnorm else nn.LayerNorm
        self.q_norm = norm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: VisionRotaryEmbedding2D | None = None) -> torch.Tensor:
        batch, tokens, channels = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rope(q), rope(k)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(batch, tokens, channels))


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of the (fractional) time followed by a two-layer MLP, as in DiT."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Label table with a trailing null row; drops labels to the null row with ``dropout_prob`` in training."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def forward(self, labels: torch.Tensor, train: bool) -> torch.Tensor:
        if train and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)


class LightningDiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning (shift/scale/gate for attention and MLP)."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, use_qknorm=False, use_swiglu=False, use_rmsnorm=False, wo_shift=False):
        super().__init__()
        if use_rmsnorm:
            self.norm1, self.norm2 = RMSNorm(hidden_size), RMSNorm(hidden_size)
        else:
            self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
            self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qkv_bias=True, qk_norm=use_qknorm, use_rmsnorm=use_rmsnorm)
        mlp_hidden = int(hidden_size * mlp_ratio)
        # LightningDiT keeps the parameter count of the GELU MLP: SwiGLU's hidden width is 2/3 of it.
        self.mlp = SwiGLUFFN(hidden_size, int(2 / 3 * mlp_hidden)) if use_swiglu else Mlp(hidden_size, mlp_hidden)
        self.wo_shift = wo_shift
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, (4 if wo_shift else 6) * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: VisionRotaryEmbedding2D | None = None) -> torch.Tensor:
        if self.wo_shift:
            scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(4, dim=1)
            shift_msa = shift_mlp = None
        else:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope=rope)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """adaLN-modulated norm and a linear map from tokens to patches of the output channels."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, use_rmsnorm: bool = False):
        super().__init__()
        self.norm_final = RMSNorm(hidden_size) if use_rmsnorm else nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class LightningDiT(ModelMixin, ConfigMixin):
    """LightningDiT velocity model: ``forward(x (B,C,H,W), t (B,) in [0,1], y (B,) labels) -> (B,C,H,W)``."""

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        input_size: int = 16,
        patch_size: int = 1,
        in_channels: int = 32,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = False,
        use_qknorm: bool = False,
        use_swiglu: bool = False,
        use_rope: bool = False,
        use_rmsnorm: bool = False,
        wo_shift: bool = False,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.learn_sigma = learn_sigma
        self.patch_size = patch_size
        self.num_classes = num_classes
        self.gradient_checkpointing = use_checkpoint  # diffusers' enable_gradient_checkpointing() sets it too
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        # Fixed sin-cos positions: a persistent buffer with the reference's state-dict name ``pos_embed``.
        self.register_buffer("pos_embed", torch.zeros(1, self.x_embedder.num_patches, hidden_size))
        if use_rope:
            head_dim = hidden_size // num_heads
            if head_dim % 4:
                raise ValueError(f"2D RoPE needs a head dimension divisible by 4; hidden_size/num_heads = {head_dim}.")
            self.feat_rope = VisionRotaryEmbedding2D(head_dim // 2, self.x_embedder.grid_size)
        else:
            self.feat_rope = None
        self.blocks = nn.ModuleList(
            LightningDiTBlock(hidden_size, num_heads, mlp_ratio, use_qknorm, use_swiglu, use_rmsnorm, wo_shift) for _ in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, use_rmsnorm)
        self.initialize_weights()

    @property
    def null_label(self) -> int | None:
        """Index of the null (unconditional) row, or None when the model was built without one."""
        return self.num_classes if self.config.class_dropout_prob > 0 else None

    def initialize_weights(self) -> None:
        """DiT's initialisation: Xavier linears, N(0, 0.02) tables, adaLN-Zero and a zero output layer."""

        def basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(basic_init)
        pos = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], self.x_embedder.grid_size)
        self.pos_embed.copy_(torch.from_numpy(pos).float().unsqueeze(0))
        weight = self.x_embedder.proj.weight.data  # like a linear layer, not a convolution
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every residual branch starts as the identity (zero gates) and the output starts at zero,
        # which DiT found to train best and which makes a freshly initialised model predict zero velocity.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, p*p*C) tokens -> (B, C, H, W)."""
        p, c, grid = self.patch_size, self.out_channels, self.x_embedder.grid_size
        x = x.reshape(x.shape[0], grid, grid, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, grid * p, grid * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Velocity for latents ``x`` at times ``t`` (0 = noise, 1 = data) and labels ``y`` (null = num_classes)."""
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        tokens = self.x_embedder(x) + self.pos_embed.to(x.dtype)
        c = self.t_embedder(t) + self.y_embedder(y, self.training)
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, c, self.feat_rope, use_reentrant=False)
            else:
                tokens = block(tokens, c, self.feat_rope)
        out = self.unpatchify(self.final_layer(tokens, c))
        if self.learn_sigma:
            out, _ = out.chunk(2, dim=1)
        return out


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """(grid_size**2, embed_dim) fixed positions: half the channels encode the row, half the column (MAE/DiT)."""
    grid_w, grid_h = np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32))
    # DiT passes the meshgrid's first output (varying along columns) as the first half; keep that order.
    emb_first = _get_1d_sincos(embed_dim // 2, grid_w.reshape(-1))
    emb_second = _get_1d_sincos(embed_dim // 2, grid_h.reshape(-1))
    return np.concatenate([emb_first, emb_second], axis=1)


def _get_1d_sincos(embed_dim: int, positions: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))
    out = np.einsum("m,d->md", positions, omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


# --------------------------------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------------------------------

# Patch size 1 on 16x16 VA-VAE latents, as LightningDiT-XL/1. S follows DiT-S (LightningDiT has no S).
DIT_SIZES = {
    "tiny": dict(depth=2, hidden_size=64, num_heads=4),
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
}

# The released LightningDiT-XL/1 (configs/lightningdit_xl_vavae_f16d32.yaml); QK-norm is off there and on
# is recommended for fp16 training (it keeps attention logits bounded).
LIGHTNINGDIT_DEFAULTS = dict(
    patch_size=1,
    mlp_ratio=4.0,
    class_dropout_prob=0.1,
    learn_sigma=False,
    use_qknorm=False,
    use_swiglu=True,
    use_rope=True,
    use_rmsnorm=True,
    wo_shift=False,
)


def dit_config(size: str, *, num_users: int, input_size: int = 16, in_channels: int = 32, **overrides) -> dict:
    """The JSON-able constructor arguments of a user-conditioned LightningDiT of a named size."""
    sizes = {name.lower(): name for name in DIT_SIZES}
    if size.lower() not in sizes:
        raise UserError(f"Unknown DiT size {size!r}; choose one of {', '.join(DIT_SIZES)}.")
    if num_users < 1:
        raise UserError(f"num_users must be at least 1, got {num_users}.")
    config = dict(LIGHTNINGDIT_DEFAULTS, **DIT_SIZES[sizes[size.lower()]])
    config.update(input_size=input_size, in_channels=in_channels, num_classes=num_users)
    unknown = set(overrides) - set(inspect.signature(LightningDiT.__init__).parameters)
    if unknown:
        raise ValueError(f"Unknown LightningDiT arguments {sorted(unknown)}.")
    config.update(overrides)
    return config


def build_dit(size: str, *, num_users: int, input_size: int = 16, in_channels: int = 32, **overrides) -> LightningDiT:
    """A freshly initialised user-conditioned LightningDiT (``num_users + 1`` label rows, the last = null user)."""
    return LightningDiT(**dit_config(size, num_users=num_users, input_size=input_size, in_channels=in_channels, **overrides))


# --------------------------------------------------------------------------------------------------
# Starting from a released LightningDiT checkpoint
# --------------------------------------------------------------------------------------------------

LABEL_TABLE_KEY = "y_embedder.embedding_table.weight"
RELEASE_CLASSES = 1000  # ImageNet: the release's table has 1001 rows, row 1000 the trained null class


@dataclass
class InitReport:
    """What :func:`load_lightningdit_init` did, tensor by tensor name."""

    loaded: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)  # partly copied (the label table: its null row)
    new: list[str] = field(default_factory=list)  # kept their fresh initialisation
    skipped: list[str] = field(default_factory=list)  # in the checkpoint, not used

    def summary(self) -> str:
        return (
            f"loaded {len(self.loaded)} tensors; {len(self.resized)} resized ({'; '.join(self.resized) or 'none'}); "
            f"{len(self.new)} new ({', '.join(self.new) or 'none'}); {len(self.skipped)} skipped ({', '.join(self.skipped) or 'none'})"
        )


def _unwrap_lightningdit_state(state: dict, path: Path) -> dict:
    for key in ("ema", "model", "state_dict", "module"):  # EMA first: it is what the release samples with
        if key in state and isinstance(state[key], dict):
            state = state[key]
            break
    tensors = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        for prefix in ("module.", "_orig_mod."):  # DDP and torch.compile wrappers
            if key.startswith(prefix):
                key = key[len(prefix):]
        tensors[key] = value
    if not tensors:
        raise CheckpointError(f"{path} holds no tensors; expected a LightningDiT checkpoint.")
    return tensors


def read_lightningdit_release(path: str | Path) -> dict[str, torch.Tensor]:
    """The (EMA) tensors of a released LightningDiT checkpoint (``.pt`` read with ``weights_only=True``, or safetensors)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"--init_from checkpoint {path} does not exist; "
            "expected a LightningDiT .pt file such as lightningdit-xl-imagenet256-800ep.pt."
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:
            raise CheckpointError(
                f"Cannot read {path} with weights_only=True ({type(err).__name__}); "
                "expected a LightningDiT checkpoint of tensors."
            ) from err
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict; expected a LightningDiT checkpoint.")
    return _unwrap_lightningdit_state(state, path)


def release_uses_qknorm(state: dict[str, torch.Tensor]) -> bool:
    """Whether a LightningDiT state dict has QK-norm gains (``blocks.N.attn.q_norm.*``)."""
    return any(".attn.q_norm." in key for key in state)


def load_lightningdit_init(model: LightningDiT, path_or_state, num_users: int | None = None,
                           release_classes: int = RELEASE_CLASSES, source: str | Path | None = None) -> InitReport:
    """Copy a LightningDiT checkpoint into ``model`` (``--init_from``): every tensor, and the trained null row.

    The checkpoint may keep its weights under ``ema`` (preferred), ``model`` or ``state_dict``; pass its path or
    :func:`read_lightningdit_release`'s tensors (then ``source`` names the file in messages). Of the label table,
    the release's null row ``release_classes``
    (1000 for ImageNet, trained by label dropout to mean "no class") is copied into the null user's row
    ``num_users``; the user rows keep their fresh initialisation. A tensor whose shape differs, or a checkpoint
    tensor with no place in the model, means the size or options do not match the release: that is a
    CheckpointError listing them. Model tensors absent from the checkpoint (e.g. QK-norm gains when
    ``use_qknorm`` is turned on) keep their initialisation and are reported as new.
    """
    path = Path(path_or_state) if not isinstance(path_or_state, dict) else Path(source or "the release")
    if num_users is not None and model.num_classes != num_users:
        raise UserError(
            f"The model was built for {model.num_classes} users but --num_users is {num_users}; "
            f"build it with num_users={num_users}."
        )
    source = path_or_state if isinstance(path_or_state, dict) else read_lightningdit_release(path)
    target = model.state_dict()
    report = InitReport()
    mismatched, unused = [], []
    for key, value in source.items():
        if key == LABEL_TABLE_KEY:
            continue
        if key not in target:
            unused.append(key)
        elif value.shape != target[key].shape:
            mismatched.append(f"{key} {tuple(value.shape)} vs model {tuple(target[key].shape)}")
        else:
            report.loaded.append(key)
    table = source.get(LABEL_TABLE_KEY)
    if table is not None and LABEL_TABLE_KEY in target and table.shape[1] != target[LABEL_TABLE_KEY].shape[1]:
        mismatched.append(f"{LABEL_TABLE_KEY} {tuple(table.shape)} vs model {tuple(target[LABEL_TABLE_KEY].shape)}")
    if mismatched or unused:
        mismatched, unused = sorted(mismatched), sorted(unused)
        problems = []
        if mismatched:
            problems.append(f"{len(mismatched)} tensors with other shapes [{_shorten(mismatched)}]")
        if unused:
            problems.append(f"{len(unused)} tensors the model has no place for [{_shorten(unused)}]")
        error = CheckpointError(
            f"--init_from {path} does not match this LightningDiT ({model.config.depth} blocks, hidden "
            f"{model.config.hidden_size}, patch {model.config.patch_size}, {model.config.in_channels} channels): "
            f"{'; '.join(problems)}; pick the --model_size and options of the release (XL: swiglu, rope, rmsnorm)."
        )
        error.mismatched_keys, error.unused_keys = mismatched, unused
        raise error
    if not report.loaded:
        raise CheckpointError(f"--init_from {path} shares no tensor with this LightningDiT; expected a LightningDiT checkpoint.")
    with torch.no_grad():
        for key in report.loaded:
            target[key].copy_(source[key])
        if table is not None:
            rows = target[LABEL_TABLE_KEY].shape[0]
            null_row = model.null_label
            if null_row is not None and table.shape[0] == release_classes + 1:
                target[LABEL_TABLE_KEY][null_row].copy_(table[release_classes])
                report.resized.append(f"{LABEL_TABLE_KEY} {tuple(table.shape)} -> ({rows}, {table.shape[1]}): the release's null "
                                      f"row {release_classes} copied to row {null_row}, {model.num_classes} user rows new")
            else:
                why = "the model has no null row" if null_row is None else f"the release's table has no null row ({table.shape[0]} rows)"
                report.skipped.append(f"{LABEL_TABLE_KEY} {tuple(table.shape)} ({why})")
    done = set(report.loaded) | {LABEL_TABLE_KEY for _ in report.resized}
    report.new = [f"{k} ({target[k].shape[0]} rows)" if k == LABEL_TABLE_KEY else k for k in target if k not in done]
    return report


def _shorten(items: list[str], limit: int = 12) -> str:
    return ", ".join(items[:limit]) + (f", ... and {len(items) - limit} more" if len(items) > limit else "")
