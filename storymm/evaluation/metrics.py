"""Evaluation metrics for next-frame prediction, aggregated honestly over a whole split.

Every number is computed over ALL windows of the split (never over one batch), from additive sums
and counts (never a mean of per-batch means), so that data-parallel workers can each accumulate
their shard and the combination is exactly the single-process result (:meth:`EvalAccumulator.from_states`).

Notation: a split has ``N`` windows; window ``i`` has a predicted image ``p_i`` and a target image
``t_i`` (both ``[3,H,W]`` in ``[0,1]``), the last input frame ``l_i``, the model's predicted visual
and text latents ``v_i`` and ``u_i``, a generated sentence and a reference sentence. ``P = 3*H*W``
is the number of values in one image. Images are used as given (they are expected in [0,1]; they
are not clipped).

Metrics (``compute()["metrics"]``):

- ``image_mse``   = sum_i sum_px (p_i - t_i)^2 / (N * P)   -- mean squared error over every value of
  every image of the split.
- ``image_l1``    = sum_i sum_px |p_i - t_i| / (N * P)      -- mean absolute error, same pooling.
- ``ssim``        = (1/N) sum_i SSIM(p_i, t_i): scikit-image ``structural_similarity`` per image,
  ``channel_axis=-1`` (mean over the 3 channels), ``data_range=1.0``, uniform window of side
  ``min(7, largest odd number <= min(H, W))`` (7 is scikit-image's default; smaller images get the
  largest odd window that fits; images smaller than 3x3 are rejected).
- ``psnr``        = (1/N) sum_i min(100, 10 log10(1 / MSE_i)) with ``MSE_i`` the mean squared error
  of image ``i`` (data range 1); an identical image (MSE 0) scores the cap, 100 dB.
- ``text_ce_true``     = (sum of token cross-entropies of the target sentences, nats, under the
  true condition) / (number of real, non-pad target tokens).
- ``text_ce_shuffled`` = the same sum with the condition shuffled across windows (the text decoder
  conditioned on another window's latent, and with a copying text head also on that window's input
  sentences) / the same token count. A model that uses its condition has
  ``text_ce_true < text_ce_shuffled``.
- ``perplexity``  = exp(text_ce_true).
- ``bleu``        = sacrebleu ``corpus_bleu`` (BLEU-4, 13a tokenisation, exponential smoothing,
  lower-cased by default because the decoder's tokenizer is uncased) of all generated sentences
  against their one reference each, divided by 100 (so 0..1). Corpus-level: n-gram counts are pooled
  over the split before the geometric mean, it is not a mean of sentence scores.
- ``cross_modal_similarity`` = (1/N) sum_i cos(v_i, u_i) (cosine of the predicted visual and text
  latents of the same window; both must have the same dimension: a model whose latents differ in
  size gives them projected to a shared space, or no latents at all, and the metric is ``None``).
- ``retrieval_r1``, ``retrieval_r10``: the N x N cosine-similarity matrix S[i,j] = cos(v_i, u_j)
  over all windows of the split. Image->text: window i is retrieved at rank
  r_i = #{j != i : S[i,j] >= S[i,i]} (ties count AGAINST the model, so a constant latent scores 0,
  not 1); recall@k = fraction of windows with r_i < k. Text->image likewise on the columns. The
  reported value is the mean of the two directions. Chance level is about k/N. Computed in chunks of
  rows, so 20k windows need only a few tens of MB.
- ``prediction_spread`` = (1/P) sum_px std_i(p_i[px]): the population standard deviation (ddof 0)
  of each predicted pixel value across all windows, averaged over pixels. 0 means the model emits the
  same image whatever the input (the known failure of the course template). Held as exact integer
  sums of the images quantised to 2^-20 (about 1e-6, far finer than 8-bit pixels), so the variance
  is exact and workers combine bit-identically.
- ``target_spread`` = the same for the target images (what a model that tracks its targets would
  show; context for ``prediction_spread``).

Floors (``compute()["floors"]``), the trivial predictors any model must beat:

- ``median_image_l1``, ``median_image_mse``: L1 / MSE (pooled as above) of ONE constant image, the
  per-pixel median of training targets (:func:`median_image`), against every target. ``None`` when
  no median image was given.
- ``copy_last_l1``, ``copy_last_mse``: L1 / MSE of predicting the last input frame.
- ``copy_two_back_l1``, ``_mse``, ``_ssim``: predicting the input frame two before the target (the
  closest one in A-B-A-B edited stories); ``None`` with fewer than 2 input frames.
- ``mean_of_inputs_l1``, ``_mse``: predicting the per-pixel mean of the K input frames.
- ``best_input_oracle_l1``, ``_mse``, ``_ssim``: per window, the input frame closest to the target by
  L1 (ties: the latest); its L1, MSE and SSIM. An oracle (it looks at the target), and the bar no model
  that only picks and copies an input frame can pass: beating it means the model predicts motion.
- ``text_ce_copy_last``, ``text_ce_copy_two_back``: the target-sentence cross-entropy (per real token,
  as ``text_ce_true``) when the text decoder is fed the last / two-back input sentence instead of the
  story: conditioned on its *encoding*, and a copying text head (``model.text_head: pointer``) may
  copy from its tokens only. What repeating that sentence is worth to the decoder, whatever the head.
- ``bleu_copy_last``, ``bleu_copy_two_back``: corpus BLEU (as ``bleu``) of repeating the last / the
  two-back input sentence as the prediction.
- ``retrieval_r1_chance``, ``retrieval_r10_chance``: min(1, k/N) for the N windows that have latents,
  the expected recall@k of random latents (ties aside).
The image-input floors need ``inputs`` in :meth:`EvalAccumulator.update`, the text ones the
``copy_*`` arguments; without them those floors are ``None``.

A metric whose inputs are empty (no text tokens, no sentences, no latents) is ``None``.

Exactness across workers: per-window scalars (errors, SSIM, PSNR, cosines) are kept per window and
per-batch text sums per batch, and totalled with ``math.fsum`` (correctly rounded, so independent of
order and grouping); pixel sums are integers; BLEU pools its n-gram counts; retrieval is computed
over the concatenated latents. ``from_states`` therefore reproduces the single-process numbers.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

STATE_VERSION = 2
PSNR_CAP_DB = 100.0
SSIM_MAX_WIN = 7
SPREAD_SCALE = 2**20  # fixed-point step for the spread sums (exact integer arithmetic)

#: Direction of each metric, for reports, comparisons and regression checks.
HIGHER_IS_BETTER: dict[str, bool] = {
    "image_mse": False,
    "image_l1": False,
    "ssim": True,
    "psnr": True,
    "perplexity": False,
    "text_ce_true": False,
    "text_ce_shuffled": False,  # informational; compare text_ce_true against it
    "bleu": True,
    "cross_modal_similarity": True,
    "retrieval_r1": True,
    "retrieval_r10": True,
    "prediction_spread": True,  # informational; 0 is the degenerate constant output
    "target_spread": True,  # informational; a property of the data
}

#: Controls, not goals: context for reading other metrics (text_ce_true against its shuffled
#: condition, prediction_spread against target_spread). Comparisons mark no best value for them and
#: the nightly check does not flag their changes as regressions.
CONTROL_METRICS = frozenset({"text_ce_shuffled", "target_spread", "prediction_spread"})

_SCALAR_KEYS = (
    "abs_err",  # per window: sum over values of |p - t|
    "sq_err",  # per window: sum over values of (p - t)^2
    "ssim",
    "psnr",
    "copy_abs",
    "copy_sq",
    "median_abs",
    "median_sq",
    "two_back_abs",
    "two_back_sq",
    "two_back_ssim",
    "mean_in_abs",
    "mean_in_sq",
    "oracle_abs",
    "oracle_sq",
    "oracle_ssim",
    "cos",
)
_BATCH_KEYS = ("ce_true", "ce_shuffled", "ce_copy_last", "ce_copy_two_back")
_COPY_SENTENCES = ("copy_last", "copy_two_back")


def ssim_window(height: int, width: int) -> int:
    """The SSIM window side used for an ``height x width`` image (see module docstring)."""
    side = min(SSIM_MAX_WIN, height, width)
    if side % 2 == 0:
        side -= 1
    if side < 3:
        raise ValueError(f"SSIM needs images of at least 3x3 pixels, got {height}x{width}")
    return side


def _as_images(x: Any, name: str) -> torch.Tensor:
    t = torch.as_tensor(x).detach().to("cpu", torch.float64)
    if t.ndim != 4 or t.shape[1] != 3:
        raise ValueError(f"{name} must be [B,3,H,W], got {tuple(t.shape)}")
    return t


def _quantise(x: torch.Tensor) -> np.ndarray:
    return torch.round(x * SPREAD_SCALE).to(torch.int64).numpy()


def _mean_std_over_pixels(s1: np.ndarray, s2: np.ndarray, n: int) -> float:
    """Mean over pixels of the population std, from exact integer sums of quantised values."""
    # n*S2 - S1^2 = n^2 * var, exact with Python integers (no cancellation error).
    s1o = s1.astype(object)
    s2o = s2.astype(object)
    n2var = np.asarray(n * s2o - s1o * s1o, dtype=np.float64)
    std = np.sqrt(np.maximum(n2var, 0.0)) / (n * SPREAD_SCALE)
    return float(std.mean())


class EvalAccumulator:
    """Accumulates one split's evaluation from batches; see the module docstring for definitions.

    Per worker: call :meth:`update` for each batch, then ``state()``; gather the states (e.g. with
    ``torch.distributed.all_gather_object``) and call ``EvalAccumulator.from_states(states).compute()``.
    """

    def __init__(self, median_image: torch.Tensor | None = None, *, bleu_lowercase: bool = True):
        self.median = None
        if median_image is not None:
            m = torch.as_tensor(median_image).detach().to("cpu", torch.float64)
            if m.ndim != 3 or m.shape[0] != 3:
                raise ValueError(f"median_image must be [3,H,W], got {tuple(m.shape)}")
            self.median = m
        self.bleu_lowercase = bleu_lowercase
        self.n_windows = 0
        self.image_shape: tuple[int, int, int] | None = None
        self.text_tokens = 0
        self.scalars: dict[str, list[float]] = {k: [] for k in _SCALAR_KEYS}
        self.batch_sums: dict[str, list[float]] = {k: [] for k in _BATCH_KEYS}
        self.pixel_sums: dict[str, np.ndarray] | None = None  # pred, pred_sq, target, target_sq
        self.hypotheses: list[str] = []
        self.references: list[str] = []
        self.copy_sentences: dict[str, list[str]] = {k: [] for k in _COPY_SENTENCES}
        self.copy_references: dict[str, list[str]] = {k: [] for k in _COPY_SENTENCES}
        self.visual_latents: list[np.ndarray] = []
        self.text_latents: list[np.ndarray] = []
        self.has_median = self.median is not None

    # ------------------------------------------------------------------------------- updates

    def update(
        self,
        *,
        pred_image,
        target_image,
        last_input,
        text_ce_sum_true: float,
        text_ce_sum_shuffled: float,
        text_tokens: int,
        visual_latent,
        text_latent,
        hypotheses: list[str],
        references: list[str],
        inputs=None,
        text_ce_sum_copy_last: float | None = None,
        text_ce_sum_copy_two_back: float | None = None,
        copy_last_sentences: list[str] | None = None,
        copy_two_back_sentences: list[str] | None = None,
    ) -> None:
        """Add one batch. Images ``[B,3,H,W]`` in [0,1]; CE sums in nats over the batch's real
        target tokens; latents ``[B,D]`` (same D) or ``None`` for both; sentence lists of length B
        (or both empty when text generation is skipped). Optional floors: ``inputs[B,K,3,H,W]``
        (all input frames), CE sums of the copy-sentence conditions (over the same tokens), and the
        copied input sentences (scored against ``references``)."""
        pred = _as_images(pred_image, "pred_image")
        target = _as_images(target_image, "target_image")
        last = _as_images(last_input, "last_input")
        if pred.shape != target.shape or last.shape != target.shape:
            raise ValueError(
                f"image shapes differ: pred {tuple(pred.shape)}, target {tuple(target.shape)}, "
                f"last_input {tuple(last.shape)}"
            )
        batch = target.shape[0]
        shape = tuple(target.shape[1:])
        frames = None
        if inputs is not None:
            frames = torch.as_tensor(inputs).detach().to("cpu", torch.float64)
            if frames.ndim != 5 or tuple(frames.shape[:1]) + tuple(frames.shape[2:]) != tuple(target.shape):
                raise ValueError(f"inputs must be [B,K,3,H,W] matching the targets, got {tuple(frames.shape)}")
        if self.image_shape is None:
            self.image_shape = shape  # type: ignore[assignment]
            ssim_window(shape[1], shape[2])  # fail early on images too small for SSIM
        elif shape != self.image_shape:
            raise ValueError(f"image shape changed from {self.image_shape} to {shape}")
        if self.median is not None and tuple(self.median.shape) != shape:
            raise ValueError(f"median_image is {tuple(self.median.shape)}, targets are {shape}")

        if len(hypotheses) != len(references):
            raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
        if len(hypotheses) not in (0, batch):
            raise ValueError(f"{len(hypotheses)} sentences for a batch of {batch}")

        if (visual_latent is None) != (text_latent is None):
            raise ValueError("give both visual_latent and text_latent, or neither")
        if visual_latent is not None:
            v = torch.as_tensor(visual_latent).detach().to("cpu", torch.float64).reshape(batch, -1)
            u = torch.as_tensor(text_latent).detach().to("cpu", torch.float64).reshape(batch, -1)
            if v.shape[1] != u.shape[1]:
                raise ValueError(
                    f"cross-modal similarity needs latents of equal size: visual_latent has "
                    f"{v.shape[1]} dims, text_latent {u.shape[1]}; project them to a shared space first"
                )
            if self.visual_latents and self.visual_latents[0].shape[1] != v.shape[1]:
                raise ValueError("latent size changed between batches")
            if self.n_windows > 0 and not self.visual_latents:
                raise ValueError("latents given for this batch but not for earlier ones")
        elif self.visual_latents:
            raise ValueError("latents missing for this batch but given for earlier ones")

        dims = (1, 2, 3)
        diff = pred - target
        self.scalars["abs_err"].extend(diff.abs().sum(dims).tolist())
        sq = diff.square().sum(dims)
        self.scalars["sq_err"].extend(sq.tolist())
        n_values = float(np.prod(shape))
        for mse in (sq / n_values).tolist():
            psnr = PSNR_CAP_DB if mse <= 0 else min(PSNR_CAP_DB, 10.0 * math.log10(1.0 / mse))
            self.scalars["psnr"].append(psnr)
        self.scalars["ssim"].extend(_ssim_batch(pred, target))

        copy = last - target
        self.scalars["copy_abs"].extend(copy.abs().sum(dims).tolist())
        self.scalars["copy_sq"].extend(copy.square().sum(dims).tolist())
        if self.median is not None:
            med = self.median.unsqueeze(0) - target
            self.scalars["median_abs"].extend(med.abs().sum(dims).tolist())
            self.scalars["median_sq"].extend(med.square().sum(dims).tolist())
        if frames is not None:
            self._input_floors(frames, target)

        qp, qt = _quantise(pred), _quantise(target)
        sums = {
            "pred": qp.sum(0),
            "pred_sq": (qp * qp).sum(0),
            "target": qt.sum(0),
            "target_sq": (qt * qt).sum(0),
        }
        if self.pixel_sums is None:
            self.pixel_sums = sums
        else:
            for key, value in sums.items():
                self.pixel_sums[key] = self.pixel_sums[key] + value

        self.batch_sums["ce_true"].append(float(text_ce_sum_true))
        self.batch_sums["ce_shuffled"].append(float(text_ce_sum_shuffled))
        for key, value in (("ce_copy_last", text_ce_sum_copy_last), ("ce_copy_two_back", text_ce_sum_copy_two_back)):
            if value is not None:
                self.batch_sums[key].append(float(value))
        self.text_tokens += int(text_tokens)

        self.hypotheses.extend(str(h) for h in hypotheses)
        self.references.extend(str(r) for r in references)
        for key, copied in (("copy_last", copy_last_sentences), ("copy_two_back", copy_two_back_sentences)):
            if copied is not None:
                if len(copied) != len(references):
                    raise ValueError(f"{len(copied)} {key} sentences for {len(references)} references")
                self.copy_sentences[key].extend(str(c) for c in copied)
                self.copy_references[key].extend(str(r) for r in references)

        if visual_latent is not None:
            cos = torch.nn.functional.cosine_similarity(v, u, dim=1, eps=1e-12)
            self.scalars["cos"].extend(cos.tolist())
            self.visual_latents.append(v.to(torch.float32).numpy())
            self.text_latents.append(u.to(torch.float32).numpy())

        self.n_windows += batch

    def _input_floors(self, frames: torch.Tensor, target: torch.Tensor) -> None:
        """Per-window errors of the floors built from the input frames ``[B,K,3,H,W]``."""
        dims = (1, 2, 3)
        if frames.shape[1] >= 2:
            two_back = frames[:, -2]
            diff = two_back - target
            self.scalars["two_back_abs"].extend(diff.abs().sum(dims).tolist())
            self.scalars["two_back_sq"].extend(diff.square().sum(dims).tolist())
            self.scalars["two_back_ssim"].extend(_ssim_batch(two_back, target))
        diff = frames.mean(1) - target
        self.scalars["mean_in_abs"].extend(diff.abs().sum(dims).tolist())
        self.scalars["mean_in_sq"].extend(diff.square().sum(dims).tolist())
        per_input = (frames - target.unsqueeze(1)).abs().sum((2, 3, 4))  # [B,K]
        # the latest input among equally close ones: flip, argmin (first), flip back
        k = frames.shape[1]
        best = k - 1 - per_input.flip(1).argmin(1)
        chosen = frames[torch.arange(frames.shape[0]), best]
        self.scalars["oracle_abs"].extend(per_input.gather(1, best[:, None]).squeeze(1).tolist())
        self.scalars["oracle_sq"].extend((chosen - target).square().sum(dims).tolist())
        self.scalars["oracle_ssim"].extend(_ssim_batch(chosen, target))

    # ---------------------------------------------------------------------- sums and states

    def sums(self) -> dict[str, float]:
        """Every additive quantity of this accumulator, totalled (floats)."""
        out: dict[str, float] = {
            "windows": float(self.n_windows),
            "values_per_image": float(np.prod(self.image_shape)) if self.image_shape else 0.0,
            "text_tokens": float(self.text_tokens),
            "latent_windows": float(len(self.scalars["cos"])),
            "sentences": float(len(self.hypotheses)),
        }
        for key in _SCALAR_KEYS:
            out[f"{key}_sum"] = math.fsum(self.scalars[key])
        for key in _BATCH_KEYS:
            out[f"{key}_sum"] = math.fsum(self.batch_sums[key])
        return out

    def state(self) -> dict:
        """A picklable snapshot: the raw per-window and per-batch terms, the pixel sums, the
        sentences and latents. Everything :meth:`from_states` needs to combine workers exactly."""
        dim = self.visual_latents[0].shape[1] if self.visual_latents else 0
        return {
            "version": STATE_VERSION,
            "n_windows": self.n_windows,
            "image_shape": list(self.image_shape) if self.image_shape else None,
            "text_tokens": self.text_tokens,
            "has_median": self.has_median,
            "bleu_lowercase": self.bleu_lowercase,
            "scalars": {k: np.asarray(v, dtype=np.float64) for k, v in self.scalars.items()},
            "batch_sums": {k: np.asarray(v, dtype=np.float64) for k, v in self.batch_sums.items()},
            "pixel_sums": None if self.pixel_sums is None else {k: v.copy() for k, v in self.pixel_sums.items()},
            "hypotheses": list(self.hypotheses),
            "references": list(self.references),
            "copy_sentences": {k: list(v) for k, v in self.copy_sentences.items()},
            "copy_references": {k: list(v) for k, v in self.copy_references.items()},
            "visual_latent": np.concatenate(self.visual_latents)
            if self.visual_latents
            else np.zeros((0, dim), np.float32),
            "text_latent": np.concatenate(self.text_latents) if self.text_latents else np.zeros((0, dim), np.float32),
        }

    def merge(self, other: dict | EvalAccumulator) -> None:
        """Add another worker's :meth:`state` (its sums and its per-window lists) into this one.

        A bare :meth:`sums` dict is refused: BLEU, retrieval and spread need the lists and pixel
        sums that only ``state()`` carries.
        """
        st = other.state() if isinstance(other, EvalAccumulator) else other
        if not isinstance(st, dict) or st.get("version") != STATE_VERSION:
            raise ValueError(
                "merge() takes another accumulator's state() (or the accumulator itself); "
                "sums() alone cannot rebuild BLEU, retrieval or prediction spread"
            )
        if st["n_windows"] == 0:
            return
        shape = tuple(st["image_shape"])
        if self.image_shape is not None and shape != self.image_shape:
            raise ValueError(f"cannot merge images of shape {shape} into {self.image_shape}")
        if self.n_windows > 0 and bool(st["has_median"]) != self.has_median:
            raise ValueError("one worker had a median image and another did not")
        has_latents = len(st["visual_latent"]) > 0
        if self.n_windows > 0 and has_latents != bool(self.visual_latents):
            raise ValueError("one worker had latents and another did not")
        if self.n_windows == 0:
            self.has_median = bool(st["has_median"])
        self.image_shape = shape  # type: ignore[assignment]
        self.n_windows += int(st["n_windows"])
        self.text_tokens += int(st["text_tokens"])
        for key in _SCALAR_KEYS:
            self.scalars[key].extend(np.asarray(st["scalars"][key], dtype=np.float64).tolist())
        for key in _BATCH_KEYS:
            self.batch_sums[key].extend(np.asarray(st["batch_sums"][key], dtype=np.float64).tolist())
        if st["pixel_sums"] is not None:
            if self.pixel_sums is None:
                self.pixel_sums = {k: np.array(v, dtype=np.int64) for k, v in st["pixel_sums"].items()}
            else:
                for key, value in st["pixel_sums"].items():
                    self.pixel_sums[key] = self.pixel_sums[key] + np.asarray(value, dtype=np.int64)
        self.hypotheses.extend(st["hypotheses"])
        self.references.extend(st["references"])
        for key in _COPY_SENTENCES:
            self.copy_sentences[key].extend(st["copy_sentences"][key])
            self.copy_references[key].extend(st["copy_references"][key])
        if has_latents:
            self.visual_latents.append(np.asarray(st["visual_latent"], dtype=np.float32))
            self.text_latents.append(np.asarray(st["text_latent"], dtype=np.float32))

    @classmethod
    def from_states(cls, states: list[dict]) -> EvalAccumulator:
        """Combine workers' states (in rank order) into one accumulator."""
        lowercase = bool(states[0].get("bleu_lowercase", True)) if states else True
        acc = cls(bleu_lowercase=lowercase)
        for st in states:
            acc.merge(st)
        return acc

    # ------------------------------------------------------------------------------ results

    def compute(self) -> dict:
        n = self.n_windows
        s = self.sums()
        values = n * s["values_per_image"]

        def pooled(key: str) -> float | None:
            return s[f"{key}_sum"] / values if n else None

        def per_window_mean(key: str) -> float | None:
            count = len(self.scalars[key])
            return s[f"{key}_sum"] / count if count else None

        def pooled_if(key: str) -> float | None:  # a floor some windows may lack (no inputs given)
            count = len(self.scalars[key])
            return s[f"{key}_sum"] / (count * s["values_per_image"]) if count else None

        tokens = self.text_tokens
        ce_true = s["ce_true_sum"] / tokens if tokens else None
        ce_shuffled = s["ce_shuffled_sum"] / tokens if tokens else None

        def ce_floor(key: str) -> float | None:  # only when every batch gave it
            complete = len(self.batch_sums[key]) == len(self.batch_sums["ce_true"])
            return s[f"{key}_sum"] / tokens if tokens and complete else None

        def corpus_bleu(hypotheses: list[str], references: list[str]) -> float | None:
            if not hypotheses:
                return None
            import sacrebleu

            return sacrebleu.corpus_bleu(hypotheses, [references], lowercase=self.bleu_lowercase).score / 100.0

        bleu = corpus_bleu(self.hypotheses, self.references)

        r1 = r10 = r1_chance = r10_chance = None
        if self.visual_latents:
            r1, r10 = retrieval_recall(
                np.concatenate(self.visual_latents), np.concatenate(self.text_latents), ks=(1, 10)
            )
            latent_windows = int(s["latent_windows"])
            r1_chance, r10_chance = (min(1.0, k / latent_windows) for k in (1, 10))

        pred_spread = target_spread = None
        if self.pixel_sums is not None and n:
            ps = self.pixel_sums
            pred_spread = _mean_std_over_pixels(ps["pred"], ps["pred_sq"], n)
            target_spread = _mean_std_over_pixels(ps["target"], ps["target_sq"], n)

        metrics = {
            "image_mse": pooled("sq_err"),
            "image_l1": pooled("abs_err"),
            "ssim": per_window_mean("ssim"),
            "psnr": per_window_mean("psnr"),
            "perplexity": math.exp(ce_true) if ce_true is not None else None,
            "text_ce_true": ce_true,
            "text_ce_shuffled": ce_shuffled,
            "bleu": bleu,
            "cross_modal_similarity": per_window_mean("cos"),
            "retrieval_r1": r1,
            "retrieval_r10": r10,
            "prediction_spread": pred_spread,
            "target_spread": target_spread,
        }
        floors = {
            "median_image_l1": pooled("median_abs") if self.has_median else None,
            "median_image_mse": pooled("median_sq") if self.has_median else None,
            "copy_last_l1": pooled("copy_abs"),
            "copy_last_mse": pooled("copy_sq"),
            "copy_two_back_l1": pooled_if("two_back_abs"),
            "copy_two_back_mse": pooled_if("two_back_sq"),
            "copy_two_back_ssim": per_window_mean("two_back_ssim"),
            "mean_of_inputs_l1": pooled_if("mean_in_abs"),
            "mean_of_inputs_mse": pooled_if("mean_in_sq"),
            "best_input_oracle_l1": pooled_if("oracle_abs"),
            "best_input_oracle_mse": pooled_if("oracle_sq"),
            "best_input_oracle_ssim": per_window_mean("oracle_ssim"),
            "text_ce_copy_last": ce_floor("ce_copy_last"),
            "text_ce_copy_two_back": ce_floor("ce_copy_two_back"),
            "bleu_copy_last": corpus_bleu(self.copy_sentences["copy_last"], self.copy_references["copy_last"]),
            "bleu_copy_two_back": corpus_bleu(
                self.copy_sentences["copy_two_back"], self.copy_references["copy_two_back"]
            ),
            "retrieval_r1_chance": r1_chance,
            "retrieval_r10_chance": r10_chance,
        }
        return {"windows": n, "metrics": metrics, "floors": floors}


# ------------------------------------------------------------------------------------ helpers


def _ssim_batch(pred: torch.Tensor, target: torch.Tensor) -> list[float]:
    from skimage.metrics import structural_similarity

    _, _, h, w = target.shape
    win = ssim_window(h, w)
    # channel-last and contiguous: scikit-image is ~4x slower on strided views
    p = np.ascontiguousarray(pred.permute(0, 2, 3, 1).numpy())
    t = np.ascontiguousarray(target.permute(0, 2, 3, 1).numpy())
    return [
        float(structural_similarity(p[i], t[i], data_range=1.0, channel_axis=-1, win_size=win))
        for i in range(p.shape[0])
    ]


def retrieval_recall(
    visual: np.ndarray, text: np.ndarray, ks: tuple[int, ...] = (1, 10), chunk_elems: int = 2**22
) -> tuple[float, ...]:
    """Recall@k of image->text and text->image retrieval, averaged over both directions.

    Cosine similarity over all pairs, processed ``chunk_elems // N`` query rows at a time; the rank
    of the true partner counts every other candidate with a similarity >= its own (ties lose).
    """
    v = torch.as_tensor(visual, dtype=torch.float64)
    u = torch.as_tensor(text, dtype=torch.float64)
    if v.shape != u.shape:
        raise ValueError(f"visual {tuple(v.shape)} and text {tuple(u.shape)} latents differ in shape")
    n = v.shape[0]
    if n == 0:
        return tuple(float("nan") for _ in ks)
    v = torch.nn.functional.normalize(v, dim=1, eps=1e-12)
    u = torch.nn.functional.normalize(u, dim=1, eps=1e-12)
    rows = max(1, min(n, chunk_elems // n))
    hits = {k: 0 for k in ks}
    for queries, keys in ((v, u), (u, v)):
        for start in range(0, n, rows):
            q = queries[start : start + rows]
            sim = q @ keys.T  # [rows, n]
            idx = torch.arange(q.shape[0])
            own = sim[idx, start + idx].unsqueeze(1)
            rank = (sim >= own).sum(1) - 1  # minus the partner itself
            for k in ks:
                hits[k] += int((rank < k).sum())
    return tuple(hits[k] / (2 * n) for k in ks)


def median_image(targets_iterable: Iterable, max_samples: int = 2048, seed: int = 0) -> torch.Tensor:
    """Per-pixel median ``[3,H,W]`` (float32) of up to ``max_samples`` training targets.

    ``targets_iterable`` yields target images ``[3,H,W]`` or batches ``[B,3,H,W]`` (tensors or
    arrays, values in [0,1]). When there are more than ``max_samples`` images, a uniform sample is
    kept by seeded reservoir sampling (deterministic for a given order and seed). The median of an
    even count is the mean of the two middle values (``numpy.median``).
    """
    rng = random.Random(seed)
    reservoir: list[np.ndarray] = []
    seen = 0
    for item in targets_iterable:
        t = torch.as_tensor(item).detach().to("cpu", torch.float32)
        if t.ndim == 3:
            t = t.unsqueeze(0)
        if t.ndim != 4 or t.shape[1] != 3:
            raise ValueError(f"targets must be [3,H,W] or [B,3,H,W], got {tuple(t.shape)}")
        for img in t.numpy():
            if len(reservoir) < max_samples:
                reservoir.append(img.copy())
            else:
                j = rng.randrange(seen + 1)
                if j < max_samples:
                    reservoir[j] = img.copy()
            seen += 1
    if not reservoir:
        raise ValueError("median_image needs at least one target image")
    return torch.from_numpy(np.median(np.stack(reservoir), axis=0).astype(np.float32))
