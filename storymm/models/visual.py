"""Visual autoencoder with two decoder heads that really differ.

The course template returned the *same tensor* as "content" and "context" and put a ReLU on a 16-d
latent (dead units).  Here:

* ``encode`` ends in ``Linear + LayerNorm``: no ReLU on the latent, so no unit can die and the latent
  has a fixed scale that the sequence model's projection (also ``Linear + LayerNorm``) can match.
* ``decode`` returns ``content`` (full resolution, the image) and ``context`` (a separate head at
  1/4 scale, trained against an area-downsampled target: a coarse layout/colour image).  They have
  different shapes by construction, so no loss can silently compare a tensor with itself.
* The encoder pools adaptively and the decoder interpolates to the exact ``image_size`` at the end, so
  any size works (60x125 default, 32x64, odd sizes).
* GroupNorm instead of BatchNorm: behaviour does not depend on the batch size or on train/eval mode,
  which matters when the autoencoder is frozen inside the sequence model or trained data-parallel.

Variants (``docs/variants.md``): ``backbone="resnet18"`` (torchvision trunk, seed parity),
``extra_layers`` (residual 3x3 refinements before the content head) and ``skips`` (U-Net style skip
connections, below).  Their defaults build exactly the original module (same parameters, same
state_dict keys), so existing checkpoints still load.

Skip connections and the predicted latent.  A U-Net autoencoder whose decoder always sees the input's
encoder features can reconstruct through the skips and leave the latent unused; but the sequence model
decodes a *predicted* latent, for a frame whose encoder features do not exist.  So here:

* skips are *additive* (``h + Conv1x1(feature)``, projections zero-initialised, so a fresh model decodes
  as if there were none) and ``decode(z)`` without ``skips`` is the plain latent decoder;
* in training each sample's skips are zeroed with probability ``skip_dropout`` (default 0.5): the
  decoder must reconstruct from the latent alone half the time, so the latent keeps the content;
* in the visual AE stage the skips come from the image being reconstructed; in the sequence model
  (``StoryContinuationModel``) they come from the encoder features of the *last input frame*, the
  nearest real frame, which gives the decoder the spatial detail of the shot (the copy path picks the
  right frame; the skips sharpen what is generated).  Encoder maps are matched to decoder stages by
  stride (nearest in log2), so both backbones work.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels), channels)


def _conv_block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        _norm(cout),
        nn.ReLU(inplace=True),
    )


def _up_block(cin: int, cout: int) -> nn.Sequential:
    # Transposed conv k=4 s=2 p=1 doubles the size exactly; cheap on CPU.
    return nn.Sequential(
        nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1, bias=False),
        _norm(cout),
        nn.ReLU(inplace=True),
    )


class _CNNEncoder(nn.Module):
    """One stride-2 conv per entry of ``channels``, then one stride-1 conv at the coarsest scale.

    Stride-1 convs at the fine scales cost as much as the whole rest of the encoder on a CPU and
    gave no measurable gain at 60x125, so there is only one, where the maps are small.
    """

    def __init__(self, channels: tuple[int, ...]):
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for c in channels:
            layers.append(_conv_block(cin, c, 2))
            cin = c
        layers.append(_conv_block(cin, cin, 1))
        self.net = nn.Sequential(*layers)
        self.out_channels = cin
        self.feature_channels = tuple(channels)
        self.feature_strides = tuple(2 ** (i + 1) for i in range(len(channels)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(output, [map after each stride-2 block, fine to coarse])``."""
        maps = []
        for layer in self.net[:-1]:
            x = layer(x)
            maps.append(x)
        return self.net[-1](x), maps


class _ResNet18Encoder(nn.Module):
    """torchvision ResNet-18 trunk (no classifier).  ``weights=None``; optional local weights file."""

    def __init__(self, weights_path: str | None = None):
        super().__init__()
        from torchvision.models import resnet18

        net = resnet18(weights=None)
        if weights_path is not None:
            state = torch.load(weights_path, map_location="cpu", weights_only=True)
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}
            net.load_state_dict(state, strict=False)
        self.net = nn.Sequential(
            net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4
        )
        self.out_channels = 512
        self.feature_channels = (64, 64, 128, 256, 512)
        self.feature_strides = (2, 4, 8, 16, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(output, [stem (stride 2), layer1 (4), layer2 (8), layer3 (16), layer4 (32)])``."""
        maps = []
        for index, layer in enumerate(self.net):
            x = layer(x)
            if index in (2, 4, 5, 6, 7):
                maps.append(x)
        return x, maps


class VisualAutoencoder(nn.Module):
    """CNN autoencoder: ``encode(x[N,3,H,W]) -> z[N,D]``; ``decode(z) -> {content, context}``.

    Args:
        latent_dim: size of the latent (16-256 are sensible).
        image_size: (H, W) of the decoded ``content`` image.
        channels: encoder widths, one stride-2 stage each; the decoder mirrors them.
        backbone: ``"cnn"`` (small, fast, the default) or ``"resnet18"`` (torchvision, seed parity).
        backbone_weights: local file with ResNet-18 weights (``torch.load(weights_only=True)``).
        pool_size: grid the encoder features are adaptively pooled to before the latent Linear.
        context_scale: ``context`` is ``ceil(H/context_scale) x ceil(W/context_scale)``.
        extra_layers: residual stride-1 conv blocks at the last decoder resolution (before the
            content head); 0 = none (the original decoder).
        skips: U-Net style additive skip connections from encoder feature maps (module docstring).
        skip_dropout: per-sample probability, in training, that a sample's skips are zeroed.
    """

    def __init__(
        self,
        latent_dim: int = 64,
        image_size: tuple[int, int] = (60, 125),
        channels: tuple[int, ...] = (32, 64, 128),
        backbone: str = "cnn",
        backbone_weights: str | None = None,
        pool_size: tuple[int, int] = (4, 8),
        context_scale: int = 4,
        extra_layers: int = 0,
        skips: bool = False,
        skip_dropout: float = 0.5,
    ):
        super().__init__()
        self.latent_dim = int(latent_dim)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.channels = tuple(int(c) for c in channels)
        self.context_scale = int(context_scale)
        H, W = self.image_size
        self.context_size = (max(1, math.ceil(H / context_scale)), max(1, math.ceil(W / context_scale)))

        # ---- encoder -------------------------------------------------------------------------
        if backbone == "cnn":
            self.backbone = _CNNEncoder(self.channels)
        elif backbone == "resnet18":
            self.backbone = _ResNet18Encoder(backbone_weights)
        else:
            raise ValueError(f"unknown visual backbone {backbone!r} (use 'cnn' or 'resnet18')")
        self.pool = nn.AdaptiveAvgPool2d(pool_size)
        enc_feat = self.backbone.out_channels * pool_size[0] * pool_size[1]
        # Latent: Linear + LayerNorm, deliberately no ReLU.
        self.to_latent = nn.Sequential(nn.Linear(enc_feat, self.latent_dim), nn.LayerNorm(self.latent_dim))

        # ---- decoder -------------------------------------------------------------------------
        n_up = len(self.channels)
        scale = 2**n_up
        self.seed_hw = (math.ceil(H / scale), math.ceil(W / scale))
        dec_ch = list(reversed(self.channels))  # e.g. 128, 64, 32
        self.seed_channels = dec_ch[0]
        self.from_latent = nn.Sequential(
            nn.Linear(self.latent_dim, dec_ch[0] * self.seed_hw[0] * self.seed_hw[1]),
            nn.ReLU(inplace=True),
        )
        ups: list[nn.Module] = []
        cin = dec_ch[0]
        outs = dec_ch[1:]
        for c in outs:
            ups.append(_up_block(cin, c))
            cin = c
        self.up = nn.ModuleList(ups)
        # Last doubling straight to RGB: a full-resolution conv stack would dominate the step time.
        self.content_head = nn.ConvTranspose2d(cin, 3, 4, stride=2, padding=1)
        # Context head: its own small conv stack on the coarse (1/4 scale after n_up-2 stages) features.
        self._context_stage = max(0, n_up - 2)  # number of up blocks applied before branching
        ctx_in = dec_ch[0] if self._context_stage == 0 else outs[self._context_stage - 1]
        self.context_head = nn.Sequential(
            nn.Conv2d(ctx_in, 32, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(32, 3, 1),
        )
        # ---- variants (absent at their defaults: the original state_dict) ---------------------
        self.extra_layers = int(extra_layers)
        if self.extra_layers:
            self.refine = nn.ModuleList([_conv_block(cin, cin, 1) for _ in range(self.extra_layers)])
        self.decoder_skips = bool(skips)
        self.skip_dropout = float(skip_dropout)
        if self.decoder_skips:
            # decoder stage i: seed (stride 2^n_up), then after up block j (stride 2^(n_up-1-j))
            stage_channels = [dec_ch[0], *outs]
            stage_strides = [2 ** (n_up - i) for i in range(n_up)]
            enc_strides = self.backbone.feature_strides
            self.skip_sources = [
                min(range(len(enc_strides)), key=lambda k: (abs(math.log2(enc_strides[k] / st)), k))
                for st in stage_strides
            ]
            self.skip_proj = nn.ModuleList()
            for stage, source in enumerate(self.skip_sources):
                proj = nn.Conv2d(self.backbone.feature_channels[source], stage_channels[stage], 1)
                nn.init.zeros_(proj.weight)
                nn.init.zeros_(proj.bias)
                self.skip_proj.append(proj)

    # ------------------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``x[N,3,H,W]`` in [0,1] -> ``z[N,latent_dim]`` (LayerNorm'd, no ReLU)."""
        h = self.pool(self.backbone(x))
        return self.to_latent(h.flatten(1))

    def encode_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(z[N,D], encoder feature maps fine to coarse)``: the latent and what the skips read."""
        out, maps = self.backbone.features(x)
        return self.to_latent(self.pool(out).flatten(1)), maps

    def _skip(self, stage: int, h: torch.Tensor, skips: list[torch.Tensor] | None, keep: torch.Tensor | None):
        if not self.decoder_skips or skips is None:
            return h
        feature = skips[self.skip_sources[stage]]
        if feature.shape[-2:] != h.shape[-2:]:
            feature = F.interpolate(feature, size=h.shape[-2:], mode="bilinear", align_corners=False)
        add = self.skip_proj[stage](feature)
        return h + (add if keep is None else add * keep)

    def decode(self, z: torch.Tensor, skips: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """``z[N,D]`` -> ``dict(content=[N,3,H,W], context=[N,3,ceil(H/4),ceil(W/4)])``, both sigmoid.

        ``skips``: encoder feature maps (``encode_with_features``) of a related image, used only when
        the model was built with ``skips=True``; ``None`` decodes from the latent alone."""
        h = self.from_latent(z).view(z.shape[0], self.seed_channels, *self.seed_hw)
        keep = None
        if self.decoder_skips and skips is not None and self.training and self.skip_dropout > 0:
            keep = (torch.rand(z.shape[0], 1, 1, 1, device=z.device) >= self.skip_dropout).to(h.dtype)
        h = self._skip(0, h, skips, keep)
        ctx_feat = h if self._context_stage == 0 else None
        for i, block in enumerate(self.up):
            h = self._skip(i + 1, block(h), skips, keep)
            if i + 1 == self._context_stage:
                ctx_feat = h
        for block in getattr(self, "refine", ()):
            h = h + block(h)
        content = self.content_head(h)
        if content.shape[-2:] != self.image_size:
            content = F.interpolate(content, size=self.image_size, mode="bilinear", align_corners=False)
        context = self.context_head(ctx_feat)
        if context.shape[-2:] != self.context_size:
            context = F.interpolate(context, size=self.context_size, mode="bilinear", align_corners=False)
        return {"content": torch.sigmoid(content), "context": torch.sigmoid(context)}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.decoder_skips:
            z, maps = self.encode_with_features(x)
            out = self.decode(z, maps)
        else:
            z = self.encode(x)
            out = self.decode(z)
        return {"latent": z, "content": out["content"], "context": out["context"]}
