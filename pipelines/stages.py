"""A model as a sequence of named stages that can be cut at any boundary.

Cut k (0 <= k <= N) means: the device runs stages [0, k), the activation after stage k-1 crosses
the wire (for k = 0 that is the preprocessed input), and the cloud runs stages [k, N). k = N is
fully local. `front(k)` followed by `tail(k)` reproduces `forward` exactly (same modules, same order).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from splitsense.errors import ModelError
from splitsense.kinds import SymbolPrior


class StagedModel(nn.Module):
    """An nn.Module made of named stages; batch dimension first everywhere."""

    def __init__(
        self,
        name: str,
        stages: Sequence[tuple[str, nn.Module]],
        input_shape: tuple[int, ...],
        class_names: Sequence[str],
    ) -> None:
        super().__init__()
        if len(stages) < 2:
            raise ModelError(f"model {name!r} needs at least 2 stages to be cut, got {len(stages)}")
        self.name = name
        self.stage_names: list[str] = [s for s, _ in stages]
        if len(set(self.stage_names)) != len(self.stage_names):
            raise ModelError(f"model {name!r} has duplicate stage names: {self.stage_names}")
        self.stages = nn.ModuleList([m for _, m in stages])
        self.input_shape = tuple(input_shape)
        self.class_names = list(class_names)

    @property
    def n_stages(self) -> int:
        return len(self.stages)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def check_cut(self, k: int) -> int:
        if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= self.n_stages:
            raise ModelError(f"cut {k!r} is out of range for model {self.name!r}: expected 0..{self.n_stages}")
        return k

    def run(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Run stages [start, stop) on x."""
        self.check_cut(start)
        self.check_cut(stop)
        if start > stop:
            raise ModelError(f"stage range [{start}, {stop}) is empty the wrong way round")
        for stage in self.stages[start:stop]:
            x = stage(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x, 0, self.n_stages)

    def front(self, k: int) -> nn.Sequential:
        """Stages [0, k) as one module (shares parameters with this model)."""
        self.check_cut(k)
        return nn.Sequential(*self.stages[:k])

    def tail(self, k: int) -> nn.Sequential:
        """Stages [k, N) as one module (shares parameters with this model)."""
        self.check_cut(k)
        return nn.Sequential(*self.stages[k:])

    def activation_shape(self, k: int) -> tuple[int, ...]:
        """Shape (without batch) of what crosses the wire at cut k."""
        self.check_cut(k)
        with torch.no_grad():
            was_training = self.training
            self.eval()
            y = self.run(torch.zeros((1, *self.input_shape)), 0, k)
            self.train(was_training)
        return tuple(y.shape[1:])

    def symbol_prior(self, k: int) -> SymbolPrior | None:
        """The coding table of the quantised code that crosses at cut k (a bottleneck), else None."""
        self.check_cut(k)
        if k == 0:
            return None
        get = getattr(self.stages[k - 1], "symbol_prior", None)
        return get() if callable(get) else None

    def cut_name(self, k: int) -> str:
        """Human name of cut k: 'input' for 0, otherwise the stage whose output crosses."""
        self.check_cut(k)
        return "input" if k == 0 else self.stage_names[k - 1]
