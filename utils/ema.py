"""Exponential moving average of a model's weights, on diffusers' ``EMAModel``.

diffusers' ``EMAModel`` does the averaging (with the warm-up of Karras et al.'s / ``ema_pytorch``'s
``decay = 1 - (1 + step / inv_gamma) ** -power``, capped at ``decay``). This wrapper adds what checkpoints
need: weights keyed by parameter name (so they load into a freshly built model without relying on parameter
order) and ``averaged_state_dict`` for sampling. Sampling and inference always use the EMA weights
(DiT, DDPM).

The update itself is one ``torch._foreach_lerp_`` over all averaged tensors (``s += (1 - decay) * (p - s)``): the
same arithmetic as ``EMAModel.step(foreach=True)``, which computes ``s -= (1 - decay) * (s - p)`` through a temporary
copy of every parameter (two kernels per tensor and a model-sized allocation each step); the lerp needs one kernel
and no temporary (``bench/bench_loop_overhead.py`` times both inside the DDPM's training step; docs/benchmarks.md).

Why warm-up: with few optimisation steps (small data sets, short runs) a decay of 0.9999 keeps the average
close to the random initialisation for thousands of steps. With warm-up the effective decay grows from 0
towards ``decay``: about 0.99 after 500 steps and 0.999 after 10k steps with ``power=3/4``.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from diffusers.training_utils import EMAModel


class EMA:
    """EMA of ``model``'s trainable parameters (buffers are taken from the live model when saving)."""

    def __init__(self, model: torch.nn.Module, decay: float = 0.9999, warmup: bool = True, power: float = 0.75):
        self.names = [name for name, p in model.named_parameters()]
        self.averager = EMAModel(
            [p for _, p in model.named_parameters()],
            decay=decay,
            use_ema_warmup=warmup,
            power=power,
            foreach=True,
        )

    @property
    def step_count(self) -> int:
        return self.averager.optimization_step

    @property
    def current_decay(self) -> float:
        return self.averager.get_decay(self.averager.optimization_step)

    def to(self, device: torch.device | str) -> EMA:
        self.averager.to(device=device)
        return self

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """One averaging step with the warm-up decay (``EMAModel``'s step count and decay, ``foreach`` lerp)."""
        averager = self.averager
        averager.optimization_step += 1
        decay = averager.get_decay(averager.optimization_step)
        averager.cur_decay_value = decay
        shadows, params, frozen = [], [], []
        for shadow, (_, param) in zip(averager.shadow_params, model.named_parameters()):
            if param.requires_grad:
                shadows.append(shadow)
                params.append(param.detach())
            else:
                frozen.append((shadow, param.detach()))
        if frozen:  # EMAModel copies parameters that do not train
            torch._foreach_copy_([s for s, _ in frozen], [p for _, p in frozen])
        if shadows:
            torch._foreach_lerp_(shadows, params, 1.0 - decay)

    @contextmanager
    def averaged_weights(self, model: torch.nn.Module):
        """Temporarily put the averaged weights into ``model`` (for sampling), restoring the live ones after."""
        params = [p for _, p in model.named_parameters()]
        self.averager.store(params)
        self.averager.copy_to(params)
        try:
            yield model
        finally:
            self.averager.restore(params)

    def weights(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.averager.shadow_params))

    def averaged_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """``model.state_dict()`` with every parameter replaced by its average."""
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        for name, shadow in self.weights().items():
            state[name] = shadow.detach().clone().to(state[name].dtype)
        return state

    def state_dict(self) -> dict:
        state = {k: v for k, v in self.averager.state_dict().items() if k != "shadow_params"}
        state["weights"] = self.weights()
        return state

    def load_state_dict(self, state: dict) -> None:
        weights = state["weights"]
        missing = [n for n in self.names if n not in weights]
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameters, e.g. {missing[:3]}")
        device = self.averager.shadow_params[0].device if self.averager.shadow_params else "cpu"
        hyper = {k: v for k, v in state.items() if k != "weights"}
        hyper["shadow_params"] = [weights[n].to(device) for n in self.names]
        self.averager.load_state_dict(hyper)
