"""Per-frame fusion of a visual and a text latent: a small registry.

Every fusion is an ``nn.Module`` built as ``cls(visual_dim, text_dim, out_dim)`` whose
``forward(v[..., Dv], t[..., Dt]) -> [..., out_dim]`` works on any leading shape.  Add one with::

    @register_fusion("mine")
    class MyFusion(nn.Module):
        def __init__(self, visual_dim, text_dim, out_dim): ...
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

FUSIONS: dict[str, type[nn.Module]] = {}


def register_fusion(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    def deco(cls: type[nn.Module]) -> type[nn.Module]:
        if name in FUSIONS:
            raise ValueError(f"fusion {name!r} is already registered")
        FUSIONS[name] = cls
        return cls

    return deco


def build_fusion(name: str, visual_dim: int, text_dim: int, out_dim: int) -> nn.Module:
    try:
        cls = FUSIONS[name]
    except KeyError:
        raise ValueError(f"unknown fusion {name!r}; registered: {sorted(FUSIONS)}") from None
    return cls(visual_dim, text_dim, out_dim)


@register_fusion("concat")
class ConcatFusion(nn.Module):
    """Course baseline: ``Linear([v; t])``."""

    def __init__(self, visual_dim: int, text_dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Linear(visual_dim + text_dim, out_dim)

    def forward(self, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.cat([v, t], dim=-1))


@register_fusion("gate")
class GateFusion(nn.Module):
    """Cross-modal gate over L2-normalised latents.

    ``v' = norm(Pv v)``, ``t' = norm(Pt t)`` (common dim = ``out_dim``), ``g = sigmoid(W [v'; t'])``,
    ``fused = g * v' + (1 - g) * t'``, output ``Linear(fused)``.  The normalised vectors are scaled by
    ``sqrt(dim)`` so each element is O(1) (a fixed norm either way; without the scale every element is
    ~1/sqrt(dim) and the following layers start in a badly scaled regime).
    """

    #: projects both latents into one space (``proj_v``/``proj_t``): latents of different sizes can
    #: still be compared there (cross-modal InfoNCE, similarity, retrieval)
    shares_space = True

    def __init__(self, visual_dim: int, text_dim: int, out_dim: int):
        super().__init__()
        self.dim = out_dim
        self.proj_v = nn.Linear(visual_dim, out_dim)
        self.proj_t = nn.Linear(text_dim, out_dim)
        self.gate = nn.Linear(2 * out_dim, out_dim)
        self.out = nn.Linear(out_dim, out_dim)
        self.scale = math.sqrt(out_dim)

    def forward(self, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        v = F.normalize(self.proj_v(v), dim=-1) * self.scale
        t = F.normalize(self.proj_t(t), dim=-1) * self.scale
        g = torch.sigmoid(self.gate(torch.cat([v, t], dim=-1)))
        return self.out(g * v + (1.0 - g) * t)
