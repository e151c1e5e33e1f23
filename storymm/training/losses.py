"""Loss terms (small pure functions returning scalar tensors) and the per-stage combinations.

Every stage loss returns ``(total, terms)``: ``total`` is the weighted sum to backpropagate and
``terms`` maps each term's name to its *unweighted* float value (plus ``total``), so each term is logged
on its own and runs with different weights stay comparable.  Terms whose weight is 0 are not computed,
except ``l1`` and ``mse``, which are always reported for images.

Alignment terms compare the *predicted* next-frame latents with the autoencoders' encodings of the
true next frame (``target_visual_latent`` / ``target_text_latent`` in the model outputs, computed
without gradient): ``alignment`` = 1 - cosine, ``infonce`` = symmetric contrastive loss over the batch
(which also penalises predicting the same latent for every story).

``cross_modal_infonce`` (beyond the seeds) is InfoNCE between the *predicted* visual latent and the
*predicted* text latent of the same window: window i's image latent should be closer to its own text
latent than to any other window's in the batch (and back).  It trains exactly what the evaluation's
``cross_modal_similarity`` and ``retrieval_r1/r10`` measure: on the latents themselves when they have
one size, else in the gate fusion's shared space (``shared_visual_latent``/``shared_text_latent``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from storymm.models.precision import autocast_off, device_constant

# ---------------------------------------------------------------------------------------------
# terms


def l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.l1_loss(pred, target)


def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(pred, target)


_SOBEL_X = ((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0))


def sobel_gradients(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel Sobel gradients ``(gx, gy)`` of ``x[N,C,H,W]`` (replicate padding, same size)."""
    c = x.shape[1]
    kx = device_constant(_SOBEL_X, x.dtype, x.device)  # made once per device: no host copy per step
    weight = torch.stack([kx, kx.t()]).unsqueeze(1).repeat(c, 1, 1, 1)  # [2C,1,3,3]
    g = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), weight, groups=c)  # [N,2C,H,W]
    return g[:, 0::2], g[:, 1::2]


def sobel_gradient_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 between the Sobel gradients (x and y, per channel) of ``pred`` and ``target``."""
    pgx, pgy = sobel_gradients(pred)
    tgx, tgy = sobel_gradients(target)
    return 0.5 * (F.l1_loss(pgx, tgx) + F.l1_loss(pgy, tgy))


def downsample_to(target: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Area-downsample ``target[N,C,H,W]`` to ``size`` (what the context head is trained against)."""
    size = tuple(size)
    if tuple(target.shape[-2:]) == size:
        return target
    return F.interpolate(target, size=size, mode="area")


def context_loss(context_pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 between the low-resolution context image and the area-downsampled full-resolution target."""
    return F.l1_loss(context_pred, downsample_to(target, context_pred.shape[-2:]))


def text_cross_entropy_sum(
    logits: torch.Tensor, labels: torch.Tensor, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum of token cross-entropies, number of non-pad labels)`` for honest aggregation across
    batches and workers (perplexity = exp(total sum / total count))."""
    ce = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=pad_id, reduction="sum"
    )
    count = (labels != pad_id).sum()
    return ce, count


def text_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Mean cross-entropy over real (non-pad) label tokens; 0 if there are none."""
    s, n = text_cross_entropy_sum(logits, labels, pad_id)
    return s / n.clamp(min=1)


def token_accuracy(logits: torch.Tensor, labels: torch.Tensor, pad_id: int) -> torch.Tensor:
    mask = labels != pad_id
    correct = (logits.argmax(-1) == labels) & mask
    return correct.sum().float() / mask.sum().clamp(min=1).float()


def cosine_alignment(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``1 - cos(a, b)``, averaged over the batch."""
    return (1.0 - F.cosine_similarity(a, b, dim=-1)).mean()


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """Symmetric InfoNCE: row i of ``a`` should match row i of ``b`` among all rows of the batch.
    In fp32 with autocast off: cosine logits / 0.07 in bf16 keep two or three significant digits."""
    with autocast_off(a):
        a = F.normalize(a.float(), dim=-1)
        b = F.normalize(b.float(), dim=-1)
        logits = a @ b.t() / temperature
        labels = torch.arange(a.shape[0], device=a.device)
        return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


# ---------------------------------------------------------------------------------------------
# perceptual (VGG16 features; weights only from a local file or the torch hub cache)

VGG16_FILENAME = "vgg16-397923af.pth"


class VGGPerceptual(nn.Module):
    """L1 between VGG16 ``relu1_2, relu2_2, relu3_3`` features of prediction and target.

    Weights come from ``weights_path`` or ``$TORCH_HOME``'s hub cache (``checkpoints/vgg16-397923af.pth``);
    nothing is downloaded.  Frozen; inputs are [0,1] images."""

    def __init__(self, weights_path: str | None = None):
        super().__init__()
        if weights_path is None:
            weights_path = os.path.join(torch.hub.get_dir(), "checkpoints", VGG16_FILENAME)
        if not os.path.isfile(weights_path):
            raise FileNotFoundError(
                f"perceptual loss needs VGG16 weights at {weights_path!r} (torchvision's {VGG16_FILENAME}); "
                "nothing is downloaded: copy the file there, pass its path, or set the perceptual weight to 0"
            )
        # Only the convolutional trunk is built and read: the file may be torchvision's whole VGG16
        # state_dict or just its ``features.0-15`` entries (what the tests save: 7 MB instead of 528 MB).
        from torchvision.models.vgg import cfgs, make_layers

        features = make_layers(cfgs["D"], batch_norm=False)
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
        wanted = {k[len("features.") :]: v for k, v in state.items() if k.startswith("features.")}
        feats = features[:16]  # up to relu3_3: the only layers used
        missing = [k for k in feats.state_dict() if k not in wanted]
        if missing:
            raise ValueError(
                f"{weights_path!r} is not a VGG16 state_dict: missing features.{missing[0]} "
                f"(and {len(missing) - 1} more)"
            )
        feats.load_state_dict({k: v for k, v in wanted.items() if int(k.split(".")[0]) < 16})
        feats = feats.eval()
        for p in feats.parameters():
            p.requires_grad_(False)
        self.slices = nn.ModuleList([feats[:4], feats[4:9], feats[9:16]])
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> VGGPerceptual:  # always frozen
        return super().train(False)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        x = (pred - self.mean) / self.std
        y = (target - self.mean) / self.std
        loss = pred.new_zeros(())
        for s in self.slices:
            x, y = s(x), s(y)
            loss = loss + F.l1_loss(x, y)
        return loss / len(self.slices)


# ---------------------------------------------------------------------------------------------
# stage losses


def _floats(terms: dict[str, torch.Tensor], floats: bool = True) -> dict:
    """Tensor terms -> floats with a single device sync; ``floats=False`` keeps the detached 0-d
    tensors (no sync: the training loop converts them only at logging steps)."""
    if not floats:
        return {name: t.detach().float().reshape(()) for name, t in terms.items()}
    values = torch.stack([t.detach().float().reshape(()) for t in terms.values()]).tolist()
    return dict(zip(terms.keys(), values))


@dataclass
class LossWeights:
    l1: float = 1.0
    mse: float = 0.0
    gradient: float = 0.1
    context: float = 0.5
    text: float = 1.0
    alignment: float = 0.1
    infonce: float = 0.0
    perceptual: float = 0.0
    infonce_temperature: float = 0.07
    cross_modal_infonce: float = 0.0
    generate_text: float = 0.0  # pointer head: the generate head's cross-entropy, times ``text``


def _image_terms(
    image: torch.Tensor,
    context: torch.Tensor | None,
    target: torch.Tensor,
    w: LossWeights,
    perceptual: nn.Module | None,
    total: torch.Tensor,
    terms: dict[str, torch.Tensor],
) -> torch.Tensor:
    t_l1 = l1(image, target)
    t_mse = mse(image, target)
    total = total + w.l1 * t_l1 + w.mse * t_mse
    terms["l1"] = t_l1.detach()
    terms["mse"] = t_mse.detach()
    if w.gradient:
        t = sobel_gradient_loss(image, target)
        total = total + w.gradient * t
        terms["gradient"] = t.detach()
    if w.context:
        if context is None:
            raise KeyError("context weight > 0 but the outputs have no 'context'")
        t = context_loss(context, target)
        total = total + w.context * t
        terms["context"] = t.detach()
    if w.perceptual:
        if perceptual is None:
            raise ValueError("perceptual weight > 0 but no perceptual module (VGGPerceptual) was given")
        t = perceptual(image, target)
        total = total + w.perceptual * t
        terms["perceptual"] = t.detach()
    return total


def visual_ae_loss(
    outputs: dict[str, torch.Tensor],
    images: torch.Tensor,
    weights: LossWeights,
    perceptual: nn.Module | None = None,
    floats: bool = True,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Visual autoencoder stage: image terms on ``content`` (+ ``context``) against ``images``."""
    terms: dict[str, torch.Tensor] = {}
    total = _image_terms(
        outputs["content"], outputs.get("context"), images, weights, perceptual, images.new_zeros(()), terms
    )
    terms["total"] = total.detach()
    return total, _floats(terms, floats)


def text_ae_loss(
    outputs: dict[str, torch.Tensor], tokens: torch.Tensor, weights: LossWeights, pad_id: int, floats: bool = True
) -> tuple[torch.Tensor, dict[str, float]]:
    """Text autoencoder stage: cross-entropy of ``logits`` against ``tokens[:, 1:]`` (pad ignored)."""
    logits, labels = outputs["logits"], tokens[:, 1:]
    ce = text_cross_entropy(logits, labels, pad_id)
    total = weights.text * ce
    terms = {
        "text": ce.detach(),
        "text_accuracy": token_accuracy(logits.detach(), labels, pad_id),
        "total": total.detach(),
    }
    return total, _floats(terms, floats)


def sequence_loss(
    outputs: dict[str, torch.Tensor],
    batch: dict[str, torch.Tensor],
    weights: LossWeights,
    pad_id: int,
    perceptual: nn.Module | None = None,
    floats: bool = True,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Sequence stage: image terms on ``image``/``context`` vs ``batch['target_frame']``, text
    cross-entropy of ``text_logits`` vs ``batch['target_tokens'][:, 1:]`` (``text_target_tokens`` where
    the training step renamed words for the pointer head) and, with the pointer head, of
    ``generate_text_logits`` (``generate_text`` weight), latent alignment terms."""
    target = batch["target_frame"]
    terms: dict[str, torch.Tensor] = {}
    total = _image_terms(
        outputs["image"], outputs.get("context"), target, weights, perceptual, target.new_zeros(()), terms
    )
    if weights.text:
        labels = batch.get("text_target_tokens", batch["target_tokens"])[:, 1:]
        ce = text_cross_entropy(outputs["text_logits"], labels, pad_id)
        total = total + weights.text * ce
        terms["text"] = ce.detach()
        terms["text_accuracy"] = token_accuracy(outputs["text_logits"].detach(), labels, pad_id)
        if weights.generate_text and "generate_text_logits" in outputs:
            # what the story model learns text from with the pointer head (StoryContinuationModel.forward);
            # the true sentences, as the frame encoders read them, not the pointer's renamed ones
            generate_ce = text_cross_entropy(outputs["generate_text_logits"], batch["target_tokens"][:, 1:], pad_id)
            total = total + weights.text * weights.generate_text * generate_ce
            terms["generate_text"] = generate_ce.detach()
    if weights.alignment or weights.infonce:
        pairs = []
        for pred_key, tgt_key in (("visual_latent", "target_visual_latent"), ("text_latent", "target_text_latent")):
            if tgt_key in outputs:
                pairs.append((outputs[pred_key], outputs[tgt_key].detach()))
        if not pairs:
            raise KeyError(
                "alignment/infonce weight > 0 but the outputs hold no target latents: call the model with "
                "target_tokens and/or target_frame"
            )
        if weights.alignment:
            t = sum(cosine_alignment(p, q) for p, q in pairs) / len(pairs)
            total = total + weights.alignment * t
            terms["alignment"] = t.detach()
        if weights.infonce:
            t = sum(info_nce(p, q, weights.infonce_temperature) for p, q in pairs) / len(pairs)
            total = total + weights.infonce * t
            terms["infonce"] = t.detach()
    if weights.cross_modal_infonce:
        # latents of different sizes meet in the fusion's shared space (the model provides it)
        v = outputs.get("shared_visual_latent", outputs["visual_latent"])
        u = outputs.get("shared_text_latent", outputs["text_latent"])
        if v.shape[-1] != u.shape[-1]:
            raise ValueError(
                f"cross_modal_infonce needs visual and text latents of one size, got {v.shape[-1]} and {u.shape[-1]}"
            )
        t = info_nce(v, u, weights.infonce_temperature)
        total = total + weights.cross_modal_infonce * t
        terms["cross_modal_infonce"] = t.detach()
    terms["total"] = total.detach()
    return total, _floats(terms, floats)
