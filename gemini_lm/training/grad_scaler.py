"""Loss scaling for fp16 training, with Megatron's semantics.

The loss is multiplied by `scale` before backward so small fp16 gradients do not flush
to zero; the optimizer divides the gradients by it again. A dynamic scaler halves the
scale when a step overflowed (after `hysteresis` overflows since the last growth) and
doubles it after `growth_interval` clean steps in a row.

The scale is a Python float: it is a power of two in every sensible configuration, so
float64 arithmetic here equals Megatron's fp32 tensor arithmetic, and multiplying by it
never forces a device sync.
"""
from __future__ import annotations

import abc

import torch

from gemini_lm.errors import UsageError


class MegatronGradScaler(abc.ABC):
    def __init__(self, initial_scale: float):
        if not initial_scale > 0.0:
            raise UsageError(f"loss scale must be positive, got {initial_scale}")
        self.scale = float(initial_scale)

    @property
    def inv_scale(self) -> float:
        return 1.0 / self.scale

    @abc.abstractmethod
    def update(self, found_inf: bool) -> None:
        """Adjust the scale after a step; `found_inf` must agree on every rank."""

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"scale": torch.tensor(self.scale, dtype=torch.float64)}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        _check_keys(tensors, self.state_tensors())
        self.scale = float(tensors["scale"])


class ConstantGradScaler(MegatronGradScaler):
    """A fixed loss scale (`--loss-scale`); overflowing steps are still skipped."""

    def update(self, found_inf: bool) -> None:
        pass


class DynamicGradScaler(MegatronGradScaler):
    def __init__(self, initial_scale: float = 2.0 ** 16, min_scale: float = 1.0,
                 growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 1000, hysteresis: int = 2):
        super().__init__(initial_scale)
        if not 0.0 < min_scale <= initial_scale:
            raise UsageError(f"min loss scale must be in (0, {initial_scale}], got {min_scale}")
        if not growth_factor > 1.0:
            raise UsageError(f"loss scale growth factor must be > 1, got {growth_factor}")
        if not 0.0 < backoff_factor < 1.0:
            raise UsageError(f"loss scale backoff factor must be in (0, 1), got {backoff_factor}")
        if growth_interval < 1 or hysteresis < 1:
            raise UsageError("loss scale window and hysteresis must be at least 1")
        self.min_scale = float(min_scale)
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.growth_interval = growth_interval
        self.hysteresis = hysteresis
        self.growth_tracker = 0                  # clean steps since the last overflow or growth
        self.hysteresis_tracker = hysteresis     # overflows left before the scale backs off

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self.growth_tracker = 0
            self.hysteresis_tracker -= 1
            if self.hysteresis_tracker <= 0:
                self.scale = max(self.scale * self.backoff_factor, self.min_scale)
        else:
            self.growth_tracker += 1
            if self.growth_tracker == self.growth_interval:
                self.growth_tracker = 0
                self.hysteresis_tracker = self.hysteresis
                self.scale = self.scale * self.growth_factor

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"scale": torch.tensor(self.scale, dtype=torch.float64),
                "growth_tracker": torch.tensor(self.growth_tracker, dtype=torch.int64),
                "hysteresis_tracker": torch.tensor(self.hysteresis_tracker, dtype=torch.int64)}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        _check_keys(tensors, self.state_tensors())
        self.scale = float(tensors["scale"])
        self.growth_tracker = int(tensors["growth_tracker"])
        self.hysteresis_tracker = int(tensors["hysteresis_tracker"])


def _check_keys(got: dict, expected: dict) -> None:
    if set(got) != set(expected):
        raise ValueError(f"grad scaler state has keys {sorted(got)}, expected {sorted(expected)}")
