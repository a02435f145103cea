"""KernelSHAP on superpixels (Lundberg and Lee, 2017, "A unified approach to interpreting
model predictions").

Shapley values of the M cells (players) for the target logit, a cell being absent when it
shows ``baseline``. Masks: all-on and all-off first, then coalition sizes k drawn from the
Shapley kernel's distribution p(k) ~ (M - 1) / (k (M - k)), k = 1 .. M - 1, each with a
uniformly random set of k cells; drawing from the kernel makes the remaining weights 1.
The two end points get weight 10^6 (Captum's value), which makes the fit satisfy
efficiency: sum_m c_m ~= f_y(x) - f_y(baseline image). See ``surrogate`` for the rest.
"""

from __future__ import annotations

import torch

from xaiserve.methods.perturbation.surrogate import SurrogateMethod

END_POINT_WEIGHT = 1e6


class KernelShap(SurrogateMethod):
    name = "kernel_shap"

    def sample(self, cells: int, samples: int, generator: torch.Generator) -> torch.Tensor:
        m = cells
        cpu = torch.device("cpu")
        ends = torch.stack(
            [
                torch.ones(m, dtype=torch.long, device=cpu),
                torch.zeros(m, dtype=torch.long, device=cpu),
            ]
        )
        if m < 2:
            return ends[:samples]
        k = torch.arange(1, m, dtype=torch.float64, device=cpu)
        sizes = (
            torch.multinomial((m - 1) / (k * (m - k)), samples - 2, True, generator=generator) + 1
        )
        ranks = (
            torch.rand(samples - 2, m, generator=generator, device=cpu)
            .argsort(dim=1)
            .argsort(dim=1)
        )
        return torch.cat([ends, (ranks < sizes.unsqueeze(1)).long()])

    def weights(self, z: torch.Tensor) -> torch.Tensor:
        kept = z.sum(dim=1)
        ends = (kept == 0) | (kept == z.shape[1])
        return torch.where(ends, END_POINT_WEIGHT, 1.0).float()
