"""Motion for the image head: warp each input frame to where the story will be at the next frame.

Why: a model that only picks and copies an input frame can never beat the oracle best input frame
(DESIGN §2). When the camera pans, the closest input (usually two frames back, with A-B-A-B editing)
is *shifted*; predicting the next frame means predicting that shift. A CNN regressor would have to
discover image correlation by itself and learns it slowly (a first version with learned correlation
features learned nothing in 400 CPU steps), so the evidence is classic signal processing and only
its use is learned:

1. **Evidence** (no parameters but a temperature): for every pair (i, j) of input frames, the phase
   correlation of their grey images, over the whole frame and over 2x2 tiles (Hann-windowed,
   low-passed cross-power spectrum), read at shifts up to ``max_shift`` of the frame size. A softmax
   over that window (relative to its peak) gives an expected shift (sub-pixel); the peak's height says
   how sure it is. Same-shot pairs peak
   sharply at the pan's displacement; pairs across a cut do not. The tiles' shifts diverge under a
   zoom, which gives a zoom estimate per pair.
2. **Use** (learned): an MLP reads all peaks and shifts plus the story context and outputs, per input
   frame k and pair p, coefficients ``a[k,p]``; frame k's translation is ``sum_p a[k,p] shift_p`` and
   its log-zoom ``sum_p b[k,p] zoom_p``. With constant-velocity shots the right coefficient is a
   ratio of frame gaps (e.g. -1 for "two back" from the pair (t-4, t-2)), so the bilinear form keeps
   what must be learned small. The last layer starts at zero: a fresh model warps nothing and
   behaves exactly like the copy head. The MLP also scores each frame for the copy attention (which
   frame, once warped, will be closest), since the evidence shows which inputs share a shot.

``StoryContinuationModel(image_head="warp")`` applies these warps with ``grid_sample`` to the input
frames, mixes them with the copy attention weights and gates the result against the generated image
(which fills what the pan reveals; the gate also sees where the warp sampled outside the frame).
Both heads share the attention, the gate's bias and the text path, so ``copy`` checkpoints load
unchanged and the two heads differ only by this module and the gate's extra input channel.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from .precision import autocast_off, device_constant

TILES = (2, 2)  # rows x columns of the tiles whose shifts carry the zoom


class MotionWarp(nn.Module):
    """``forward(frames[B,K,3,H,W], ctx[B,C])`` -> warped frames and what they were warped by.

    ``params`` are ``(tx, ty, log_zoom)`` per input frame in ``affine_grid``'s normalised
    coordinates; ``inside`` is 1 where the warp sampled inside the frame (reflected outside)."""

    def __init__(self, context_frames: int, ctx_dim: int, max_shift: float = 0.25, hidden: int = 128):
        super().__init__()
        self.context_frames = int(context_frames)
        if self.context_frames < 2:
            raise ValueError("the warp head estimates motion between input frames: it needs at least 2")
        self.pairs = list(itertools.combinations(range(self.context_frames), 2))
        self.max_shift = float(max_shift)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(20.0)))  # sharpness of the shift softmax
        n_regions = 1 + TILES[0] * TILES[1]
        n_pairs = len(self.pairs)
        self.mlp = nn.Sequential(
            nn.Linear(n_pairs * n_regions * 3 + ctx_dim, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, (2 * n_pairs + 1) * self.context_frames),
        )
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    # ------------------------------------------------------------------------------------------
    def _regions(self, h: int, w: int) -> list[tuple[slice, slice]]:
        regions = [(slice(0, h), slice(0, w))]
        th, tw = h // TILES[0], w // TILES[1]
        for r in range(TILES[0]):
            for c in range(TILES[1]):
                regions.append((slice(r * th, (r + 1) * th), slice(c * tw, (c + 1) * tw)))
        return regions

    def _phase_shift(self, grey: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``grey[B,K,h,w]`` -> (shift ``[B,P,2]`` in pixels (x, y), peak ``[B,P]``) for every pair."""
        h, w = grey.shape[-2:]
        grey = grey - grey.mean((-2, -1), keepdim=True)
        window = torch.outer(
            torch.hann_window(h, periodic=False, device=grey.device, dtype=grey.dtype),
            torch.hann_window(w, periodic=False, device=grey.device, dtype=grey.dtype),
        )
        spectrum = torch.fft.rfft2(grey * window)  # [B,K,h,w//2+1]
        first = torch.stack([spectrum[:, i] for i, _ in self.pairs], 1)
        second = torch.stack([spectrum[:, j] for _, j in self.pairs], 1)
        cross = first.conj() * second
        fy = torch.fft.fftfreq(h, device=grey.device)[:, None]
        fx = torch.fft.rfftfreq(w, device=grey.device)[None, :]
        lowpass = torch.exp(-(fy**2 + fx**2) / (2 * 0.15**2))  # drop the aliased finest frequencies
        corr = torch.fft.irfft2(cross / (cross.abs() + 1e-6) * lowpass, s=(h, w))  # corr[d] = sum f_i(p) f_j(p+d)
        ry = max(1, min(int(round(self.max_shift * h)), h // 2 - 1))
        rx = max(1, min(int(round(self.max_shift * w)), w // 2 - 1))
        dy = torch.arange(-ry, ry + 1, device=grey.device)
        dx = torch.arange(-rx, rx + 1, device=grey.device)
        volume = corr[:, :, dy.remainder(h)][:, :, :, dx.remainder(w)].flatten(2)  # [B,P,S]
        peak = volume.max(-1, keepdim=True).values
        # Relative to the peak, so the softmax is about as sharp for faint and strong matches.
        prob = torch.softmax(volume / peak.clamp(min=1e-6) * self.log_temperature.exp(), dim=-1)
        grid = torch.stack(torch.meshgrid(dx.to(grey.dtype), dy.to(grey.dtype), indexing="xy"), -1)  # [Sy,Sx,2]
        shift = torch.einsum("bps,sd->bpd", prob, grid.flatten(0, 1))
        return shift, peak.squeeze(-1)

    def evidence(self, frames: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per pair: ``translation[B,P,2]`` (x, y, as fractions of the frame), ``zoom[B,P]`` (relative
        size change from the tiles' diverging shifts), and ``features[B, P*regions*3]`` for the MLP."""
        grey = frames.float().mean(2)
        h, w = grey.shape[-2:]
        shifts, peaks = [], []
        for rows, cols in self._regions(h, w):
            shift, peak = self._phase_shift(grey[..., rows, cols])
            shifts.append(shift / device_constant((w, h), shift.dtype, shift.device))  # fractions of the frame
            peaks.append(peak)
        shift = torch.stack(shifts, 2)  # [B,P,R,2]
        peak = torch.stack(peaks, 2)  # [B,P,R]
        tiles = shift[:, :, 1:].view(*shift.shape[:2], TILES[0], TILES[1], 2)
        # Tile centres sit at +-1/4 of the frame from its centre: a zoom moves them apart by twice that.
        spread_x = (tiles[:, :, :, -1, 0] - tiles[:, :, :, 0, 0]).mean(-1) / 0.5
        spread_y = (tiles[:, :, -1, :, 1] - tiles[:, :, 0, :, 1]).mean(-1) / 0.5
        features = torch.cat([shift * 10.0, peak[..., None] * 10.0], -1).flatten(1)  # O(1) inputs
        return {"translation": shift[:, :, 0], "zoom": (spread_x + spread_y) / 2, "features": features}

    def forward(self, frames: torch.Tensor, ctx: torch.Tensor) -> dict[str, torch.Tensor]:
        """``warped[B,K,3,H,W]`` (each input frame moved to the next frame's time), ``inside[B,K,1,H,W]``,
        ``params[B,K,3]`` and ``frame_logits[B,K]``: how well each frame will do once warped, from the
        same evidence (which pairs are one shot), added to the copy attention's scores.

        In fp32 with autocast off, whatever the caller runs under: bf16 coordinates would move every
        sample point (a fresh head would no longer be exactly the copy head), and the head is small."""
        with autocast_off(frames):
            return self._warp(frames.float(), ctx.float())

    def _warp(self, frames: torch.Tensor, ctx: torch.Tensor) -> dict[str, torch.Tensor]:
        b, k = frames.shape[:2]
        if k != self.context_frames:
            raise ValueError(f"this warp head was built for {self.context_frames} input frames, got {k}")
        ev = self.evidence(frames)
        out = self.mlp(torch.cat([ev["features"].to(ctx.dtype), ctx], -1)).float()
        n_pairs = len(self.pairs)
        coef = out[:, : 2 * k * n_pairs].view(b, 2, k, n_pairs)
        frame_logits = out[:, 2 * k * n_pairs :]
        # Normalised coordinates span 2 per frame width: a shift of a fraction f is 2f.
        translation = 2.0 * torch.einsum("bkp,bpd->bkd", coef[:, 0], ev["translation"])  # [B,K,2]
        log_zoom = torch.einsum("bkp,bp->bk", coef[:, 1], ev["zoom"])
        # Soft bounds (identity near 0): at most a whole frame of shift and a factor e^0.5 of zoom, so a
        # wild coefficient early in training cannot overflow the sampling grid.
        translation = 2.0 * torch.tanh(translation / 2.0)
        log_zoom = 0.5 * torch.tanh(log_zoom / 0.5)
        params = torch.cat([translation, log_zoom[..., None]], -1)
        zoom = log_zoom.exp()
        theta = torch.zeros(b, k, 2, 3, dtype=frames.dtype, device=frames.device)
        theta[..., 0, 0] = zoom
        theta[..., 1, 1] = zoom
        theta[..., 0, 2] = translation[..., 0]
        theta[..., 1, 2] = translation[..., 1]
        flat = frames.flatten(0, 1)
        grid = F.affine_grid(theta.flatten(0, 1), list(flat.shape), align_corners=False)
        # Reflection outside the frame: zeros put a black band in the way of every shift (training
        # stalled at no motion) and border smears, which L1 rewards by pushing shifts to their bounds.
        warped = F.grid_sample(flat, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        inside = (grid.abs() <= 1).all(-1, keepdim=True).to(frames.dtype).permute(0, 3, 1, 2)
        return {
            "warped": warped.view_as(frames),
            "inside": inside.view(b, k, 1, *frames.shape[-2:]),
            "params": params.to(frames.dtype),
            "frame_logits": frame_logits.to(frames.dtype),
        }
