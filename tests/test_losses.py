"""Loss terms against small hand-computed cases, and the stage losses' bookkeeping."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from storymm.training import losses as L

PAD = 0


def test_l1_mse_hand_values():
    a = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
    b = torch.tensor([[1.0, 1.0], [0.0, 3.0]])
    assert L.l1(a, b).item() == pytest.approx((1 + 0 + 2 + 0) / 4)
    assert L.mse(a, b).item() == pytest.approx((1 + 0 + 4 + 0) / 4)


def test_sobel_constant_image_is_zero():
    x = torch.full((2, 3, 7, 9), 0.3)
    gx, gy = L.sobel_gradients(x)
    # zero up to float32 rounding: the convolution's summation order (and so its last bit) depends
    # on the CPU's vector unit (exactly 0 on one 2-core CI machine, 6e-8 on another)
    assert gx.abs().max().item() < 1e-6 and gy.abs().max().item() < 1e-6
    # two different constants: gradients identical (zero), so the loss is zero
    assert L.sobel_gradient_loss(x, torch.full_like(x, 0.9)).item() < 1e-6


def test_sobel_ramp_hand_value():
    w = 6
    ramp = torch.arange(w, dtype=torch.float32).view(1, 1, 1, w).expand(1, 1, 5, w).contiguous()
    gx, gy = L.sobel_gradients(ramp)
    # interior columns: (-1-2-1)*(x-1) + (1+2+1)*(x+1) = 8 for slope 1
    assert torch.allclose(gx[..., 1:-1], torch.full_like(gx[..., 1:-1], 8.0))
    assert gy.abs().max().item() == 0.0
    # loss against a constant image: 0.5 * mean|gx|  (gy is zero for both)
    expected = 0.5 * gx.abs().mean().item()
    assert L.sobel_gradient_loss(ramp, torch.zeros_like(ramp)).item() == pytest.approx(expected)
    # per channel: a ramp in channel 1 only does not leak into channel 0
    x = torch.zeros(1, 2, 5, w)
    x[:, 1] = ramp[:, 0]
    gx2, _ = L.sobel_gradients(x)
    assert gx2[:, 0].abs().max().item() == 0.0 and gx2[:, 1].abs().max().item() > 0


def test_context_loss_uses_area_downsampled_target():
    target = torch.zeros(1, 3, 8, 8)
    target[..., :4, :4] = 1.0  # top-left quadrant white
    ctx = torch.zeros(1, 3, 2, 2)
    ctx[..., 0, 0] = 1.0
    assert L.context_loss(ctx, target).item() == pytest.approx(0.0)
    # area downsampling = block mean
    target2 = torch.rand(1, 3, 8, 12)
    down = L.downsample_to(target2, (2, 3))
    assert torch.allclose(down, target2.view(1, 3, 2, 4, 3, 4).mean(dim=(3, 5)), atol=1e-6)
    assert L.context_loss(torch.zeros(1, 3, 2, 3), target2).item() == pytest.approx(target2.mean().item(), rel=1e-5)


def test_text_cross_entropy_ignores_pad_exactly():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 7)
    labels = torch.tensor([[3, 5, PAD, PAD], [1, 2, 6, PAD]])
    mask = labels != PAD
    logp = F.log_softmax(logits, -1)
    manual = -logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)[mask].mean()
    ce = L.text_cross_entropy(logits, labels, PAD)
    assert ce.item() == pytest.approx(manual.item(), rel=1e-6)
    s, n = L.text_cross_entropy_sum(logits, labels, PAD)
    assert n.item() == 5 and s.item() == pytest.approx(manual.item() * 5, rel=1e-6)
    # logits at pad positions do not matter at all
    logits2 = logits.clone()
    logits2[~mask] = torch.randn(int((~mask).sum()), 7) * 100
    assert L.text_cross_entropy(logits2, labels, PAD).item() == pytest.approx(ce.item(), rel=1e-6)
    # a non-zero pad id is honoured
    labels4 = labels.masked_fill(~mask, 4)  # 4 is not a real label above
    assert L.text_cross_entropy(logits, labels4, 4).item() == pytest.approx(ce.item(), rel=1e-6)
    # all padding: 0, not NaN
    assert L.text_cross_entropy(logits, torch.zeros_like(labels), PAD).item() == 0.0


def test_token_accuracy():
    logits = torch.zeros(1, 3, 4)
    logits[0, 0, 2] = 1
    logits[0, 1, 3] = 1
    logits[0, 2, 1] = 1
    labels = torch.tensor([[2, 1, PAD]])
    assert L.token_accuracy(logits, labels, PAD).item() == pytest.approx(0.5)


def test_cosine_alignment_hand_values():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert L.cosine_alignment(a, a * 3).item() == pytest.approx(0.0, abs=1e-6)
    assert L.cosine_alignment(a, -a).item() == pytest.approx(2.0)
    assert L.cosine_alignment(a, a.flip(0)).item() == pytest.approx(1.0)


def test_info_nce_hand_value_and_ordering():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = 0.5
    # logits = I / t: each row's CE = -log(e^{2} / (e^{2} + e^{0}))
    expected = -math.log(math.exp(1 / t) / (math.exp(1 / t) + 1.0))
    assert L.info_nce(a, a, temperature=t).item() == pytest.approx(expected, rel=1e-6)
    torch.manual_seed(0)
    x = torch.randn(16, 8)
    y = x + 0.1 * torch.randn(16, 8)
    aligned = L.info_nce(x, y).item()
    shuffled = L.info_nce(x, y[torch.randperm(16)]).item()
    assert aligned < 0.1 < shuffled
    # symmetric
    assert L.info_nce(x, y).item() == pytest.approx(L.info_nce(y, x).item(), rel=1e-5)


def test_loss_weights_defaults():
    w = L.LossWeights()
    assert (w.l1, w.mse, w.gradient, w.context, w.text, w.alignment, w.infonce) == (1, 0, 0.1, 0.5, 1, 0.1, 0)


def _seq_outputs(b=4, h=12, w=20, v=11, length=6, d=8):
    torch.manual_seed(0)
    out = {
        "image": torch.rand(b, 3, h, w, requires_grad=True),
        "context": torch.rand(b, 3, 3, 5, requires_grad=True),
        "text_logits": torch.randn(b, length - 1, v, requires_grad=True),
        "visual_latent": torch.randn(b, d, requires_grad=True),
        "text_latent": torch.randn(b, d, requires_grad=True),
        "target_visual_latent": torch.randn(b, d),
        "target_text_latent": torch.randn(b, d),
    }
    tt = torch.randint(1, v, (b, length))
    tt[:, -2:] = PAD
    batch = {"target_frame": torch.rand(b, 3, h, w), "target_tokens": tt}
    return out, batch


def test_sequence_loss_terms_and_total():
    out, batch = _seq_outputs()
    w = L.LossWeights(mse=0.5, infonce=0.2)
    total, terms = L.sequence_loss(out, batch, w, PAD)
    assert set(terms) == {"l1", "mse", "gradient", "context", "text", "text_accuracy", "alignment", "infonce", "total"}
    assert all(isinstance(v, float) for v in terms.values())
    recomputed = (
        w.l1 * terms["l1"]
        + w.mse * terms["mse"]
        + w.gradient * terms["gradient"]
        + w.context * terms["context"]
        + w.text * terms["text"]
        + w.alignment * terms["alignment"]
        + w.infonce * terms["infonce"]
    )
    assert total.item() == pytest.approx(recomputed, rel=1e-5)
    assert terms["total"] == pytest.approx(total.item(), rel=1e-6)
    assert terms["l1"] == pytest.approx(L.l1(out["image"], batch["target_frame"]).item(), rel=1e-6)
    assert terms["text"] == pytest.approx(
        L.text_cross_entropy(out["text_logits"], batch["target_tokens"][:, 1:], PAD).item(), rel=1e-6
    )
    total.backward()
    assert out["image"].grad is not None and out["text_latent"].grad is not None


def test_sequence_loss_skips_zero_weights_but_reports_l1_mse():
    out, batch = _seq_outputs()
    w = L.LossWeights(l1=0, mse=0, gradient=0, context=0, text=1, alignment=0, infonce=0)
    total, terms = L.sequence_loss(out, batch, w, PAD)
    assert set(terms) == {"l1", "mse", "text", "text_accuracy", "total"}
    assert total.item() == pytest.approx(terms["text"], rel=1e-6)
    del out["target_visual_latent"], out["target_text_latent"]
    with pytest.raises(KeyError):
        L.sequence_loss(out, batch, L.LossWeights(), PAD)


def test_visual_and_text_ae_losses():
    torch.manual_seed(0)
    images = torch.rand(2, 3, 12, 20)
    outputs = {"content": images.clone(), "context": L.downsample_to(images, (3, 5)), "latent": torch.randn(2, 4)}
    total, terms = L.visual_ae_loss(outputs, images, L.LossWeights())
    assert total.item() == pytest.approx(0.0, abs=1e-6)
    assert set(terms) == {"l1", "mse", "gradient", "context", "total"}
    tokens = torch.tensor([[101, 5, 6, 102, PAD], [101, 7, 102, PAD, PAD]])
    logits = torch.randn(2, 4, 120)
    total, terms = L.text_ae_loss({"logits": logits}, tokens, L.LossWeights(), PAD)
    assert total.item() == pytest.approx(L.text_cross_entropy(logits, tokens[:, 1:], PAD).item())
    assert set(terms) == {"text", "text_accuracy", "total"}


def test_perceptual_without_weights_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="VGG16 weights"):
        L.VGGPerceptual(str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="perceptual"):
        out, batch = _seq_outputs()
        L.sequence_loss(out, batch, L.LossWeights(perceptual=1.0), PAD)
