"""Metrics against small hand-computed cases, and the key property: sharded == single process."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch

from storymm.evaluation.metrics import EvalAccumulator, median_image, retrieval_recall, ssim_window

H, W = 8, 10


def _batch(b=4, seed=0, *, pred=None, target=None, last=None, latents=True, dim=16, sentences=None):
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(b, 3, H, W, generator=g) if target is None else target
    pred = torch.rand(b, 3, H, W, generator=g) if pred is None else pred
    last = torch.rand(b, 3, H, W, generator=g) if last is None else last
    vis = torch.randn(b, dim, generator=g) if latents else None
    txt = torch.randn(b, dim, generator=g) if latents else None
    hyps, refs = sentences if sentences is not None else ([], [])
    return dict(
        pred_image=pred,
        target_image=target,
        last_input=last,
        text_ce_sum_true=float(torch.rand(1, generator=g)) * 30,
        text_ce_sum_shuffled=float(torch.rand(1, generator=g)) * 40,
        text_tokens=int(torch.randint(5, 20, (1,), generator=g)),
        visual_latent=vis,
        text_latent=txt,
        hypotheses=hyps,
        references=refs,
    )


def test_l1_mse_exact_and_floors():
    target = torch.zeros(2, 3, H, W)
    target[1] = 1.0
    pred = torch.full((2, 3, H, W), 0.25)
    last = torch.full((2, 3, H, W), 0.5)
    median = torch.full((3, H, W), 0.75)
    acc = EvalAccumulator(median_image=median)
    acc.update(**_batch(2, pred=pred, target=target, last=last))
    out = acc.compute()
    m, f = out["metrics"], out["floors"]
    assert out["windows"] == 2
    # window 0: |0.25-0| = .25 ; window 1: |0.25-1| = .75  -> mean .5 ; mse (0.0625+0.5625)/2
    assert m["image_l1"] == pytest.approx(0.5, abs=1e-12)
    assert m["image_mse"] == pytest.approx(0.3125, abs=1e-12)
    assert f["copy_last_l1"] == pytest.approx(0.5, abs=1e-12)
    assert f["copy_last_mse"] == pytest.approx(0.25, abs=1e-12)
    # median .75: errors .75 and .25
    assert f["median_image_l1"] == pytest.approx(0.5, abs=1e-12)
    assert f["median_image_mse"] == pytest.approx((0.5625 + 0.0625) / 2, abs=1e-12)
    # psnr per window: 10log10(1/0.0625), 10log10(1/0.5625)
    expected_psnr = (10 * math.log10(16) + 10 * math.log10(1 / 0.5625)) / 2
    assert m["psnr"] == pytest.approx(expected_psnr, rel=1e-12)
    # constant prediction -> spread 0 exactly; targets 0 and 1 -> std 0.5 at every pixel
    assert m["prediction_spread"] == 0.0
    assert m["target_spread"] == pytest.approx(0.5, abs=1e-9)


def test_floors_none_without_median():
    acc = EvalAccumulator()
    acc.update(**_batch(3))
    f = acc.compute()["floors"]
    assert f["median_image_l1"] is None and f["median_image_mse"] is None
    assert f["copy_last_l1"] > 0


def test_perfect_prediction():
    target = torch.rand(3, 3, H, W, generator=torch.Generator().manual_seed(1))
    acc = EvalAccumulator()
    acc.update(**_batch(3, pred=target.clone(), target=target))
    m = acc.compute()["metrics"]
    assert m["image_mse"] == 0.0 and m["image_l1"] == 0.0
    assert m["ssim"] == pytest.approx(1.0, abs=1e-9)
    assert m["psnr"] == 100.0
    assert m["prediction_spread"] > 0
    assert m["prediction_spread"] == pytest.approx(m["target_spread"], abs=1e-12)


def test_ssim_matches_skimage_and_small_window():
    from skimage.metrics import structural_similarity

    assert ssim_window(60, 125) == 7
    assert ssim_window(6, 10) == 5
    assert ssim_window(3, 3) == 3
    with pytest.raises(ValueError):
        ssim_window(2, 8)
    b = _batch(2, seed=3)
    acc = EvalAccumulator()
    acc.update(**b)
    p = b["pred_image"].permute(0, 2, 3, 1).double().numpy()
    t = b["target_image"].permute(0, 2, 3, 1).double().numpy()
    want = np.mean(
        [structural_similarity(p[i], t[i], data_range=1.0, channel_axis=-1, win_size=7) for i in range(2)]
    )
    assert acc.compute()["metrics"]["ssim"] == pytest.approx(want, rel=1e-12)


def test_text_metrics():
    acc = EvalAccumulator()
    b1 = _batch(2, seed=1)
    b1.update(text_ce_sum_true=6.0, text_ce_sum_shuffled=9.0, text_tokens=3)
    b2 = _batch(2, seed=2)
    b2.update(text_ce_sum_true=4.0, text_ce_sum_shuffled=1.0, text_tokens=2)
    acc.update(**b1)
    acc.update(**b2)
    m = acc.compute()["metrics"]
    assert m["text_ce_true"] == pytest.approx(10.0 / 5)  # pooled, not the mean of 2.0 and 2.0
    assert m["text_ce_shuffled"] == pytest.approx(10.0 / 5)
    assert m["perplexity"] == pytest.approx(math.exp(2.0))


def test_bleu_identical_and_unrelated():
    refs = [
        "the cat sat on the mat near the door",
        "a man walks into the old house at night",
        "two children play with a red ball in the park",
    ]
    acc = EvalAccumulator()
    acc.update(**_batch(3, sentences=(list(refs), list(refs))))
    assert acc.compute()["metrics"]["bleu"] == pytest.approx(1.0)

    unrelated = [
        "stock prices fell sharply on monday morning",
        "quantum computers use qubits for computation",
        "bake the bread for forty minutes until golden",
    ]
    acc = EvalAccumulator()
    acc.update(**_batch(3, sentences=(unrelated, refs)))
    bleu = acc.compute()["metrics"]["bleu"]
    assert 0.0 <= bleu < 0.3


def test_bleu_lowercases_uncased_hypotheses():
    acc = EvalAccumulator()
    acc.update(**_batch(1, sentences=(["the old man opens the door slowly"], ["The old man opens the door slowly"])))
    assert acc.compute()["metrics"]["bleu"] == pytest.approx(1.0)


def test_retrieval_identical_and_random():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(300, 32, generator=g)
    acc = EvalAccumulator()
    for i in range(0, 300, 50):
        b = _batch(50, seed=i)
        b.update(visual_latent=z[i : i + 50], text_latent=z[i : i + 50].clone())
        acc.update(**b)
    m = acc.compute()["metrics"]
    assert m["retrieval_r1"] == 1.0 and m["retrieval_r10"] == 1.0
    assert m["cross_modal_similarity"] == pytest.approx(1.0)

    v, u = torch.randn(400, 32, generator=g), torch.randn(400, 32, generator=g)
    r1, r10 = retrieval_recall(v.numpy(), u.numpy())
    assert r1 < 0.02  # chance 1/400
    assert r10 < 0.08  # chance 10/400
    # chunking does not change the answer
    assert retrieval_recall(v.numpy(), u.numpy(), chunk_elems=400 * 7) == (r1, r10)


def test_retrieval_constant_latent_is_not_rewarded():
    v = np.ones((20, 8))
    r1, r10 = retrieval_recall(v, v)
    assert r1 == 0.0 and r10 == 0.0  # every candidate ties; ties count against the model


def test_cross_modal_similarity_value_and_dim_check():
    acc = EvalAccumulator()
    b = _batch(2)
    b.update(
        visual_latent=torch.tensor([[1.0, 0.0], [1.0, 1.0]]),
        text_latent=torch.tensor([[0.0, 1.0], [2.0, 2.0]]),
    )
    acc.update(**b)
    assert acc.compute()["metrics"]["cross_modal_similarity"] == pytest.approx(0.5)
    b = _batch(2)
    b.update(visual_latent=torch.randn(2, 8), text_latent=torch.randn(2, 6))
    with pytest.raises(ValueError, match="equal size"):
        EvalAccumulator().update(**b)


def test_no_latents_gives_none():
    acc = EvalAccumulator()
    acc.update(**_batch(3, latents=False))
    m = acc.compute()["metrics"]
    assert m["cross_modal_similarity"] is None and m["retrieval_r1"] is None and m["bleu"] is None


def test_prediction_spread_constant_vs_varying():
    acc = EvalAccumulator()
    const = torch.rand(1, 3, H, W).expand(4, -1, -1, -1).contiguous()
    for seed in range(3):
        acc.update(**_batch(4, seed=seed, pred=const))
    assert acc.compute()["metrics"]["prediction_spread"] == 0.0
    acc = EvalAccumulator()
    for seed in range(3):
        acc.update(**_batch(4, seed=seed))
    m = acc.compute()["metrics"]
    # uniform(0,1) per pixel: std ~ 0.289
    assert 0.2 < m["prediction_spread"] < 0.35
    assert 0.2 < m["target_spread"] < 0.35


def test_sharded_equals_single_process_exactly():
    sentences = [f"frame {i} shows the {['cat', 'dog', 'boy'][i % 3]} near tree {i % 5}" for i in range(40)]
    hyps = [s.replace("near", "by") if i % 2 else s for i, s in enumerate(sentences)]
    batches = []
    for k in range(8):
        b = _batch(5, seed=100 + k, sentences=(hyps[5 * k : 5 * k + 5], sentences[5 * k : 5 * k + 5]))
        batches.append(b)
    median = torch.rand(3, H, W)

    single = EvalAccumulator(median_image=median)
    for b in batches:
        single.update(**b)

    # interleaved shards, as a distributed sampler would give them
    w0, w1 = EvalAccumulator(median_image=median), EvalAccumulator(median_image=median)
    for i, b in enumerate(batches):
        (w0 if i % 2 == 0 else w1).update(**b)
    states = [pickle.loads(pickle.dumps(w.state())) for w in (w0, w1)]  # as all_gather_object does
    combined = EvalAccumulator.from_states(states).compute()
    want = single.compute()
    assert combined == want  # exact, not approximate

    # contiguous shards too, and merge() on an existing accumulator
    a, b_ = EvalAccumulator(median_image=median), EvalAccumulator(median_image=median)
    for b in batches[:3]:
        a.update(**b)
    for b in batches[3:]:
        b_.update(**b)
    a.merge(b_.state())
    assert a.compute() == want
    assert a.sums() == pytest.approx(single.sums(), rel=0, abs=0)
    assert want["windows"] == 40
    assert all(v is not None for v in want["metrics"].values())
    assert all(v is not None for v in want["floors"].values())


def test_merge_refuses_bare_sums():
    acc = EvalAccumulator()
    acc.update(**_batch(2))
    with pytest.raises(ValueError, match="state"):
        EvalAccumulator().merge(acc.sums())


def test_shape_errors():
    acc = EvalAccumulator()
    with pytest.raises(ValueError):
        acc.update(**_batch(2, pred=torch.rand(2, 3, H, W + 1)))
    with pytest.raises(ValueError):
        EvalAccumulator(median_image=torch.rand(3, H + 1, W)).update(**_batch(2))


def test_median_image():
    imgs = [torch.full((3, 4, 5), float(v)) for v in (0.1, 0.9, 0.3, 0.5, 0.2)]
    med = median_image(imgs)
    assert med.shape == (3, 4, 5)
    assert torch.allclose(med, torch.full((3, 4, 5), 0.3))
    # batches are accepted; an even count averages the middle pair
    med = median_image([torch.stack(imgs[:2]), torch.stack(imgs[2:4])])
    assert torch.allclose(med, torch.full((3, 4, 5), 0.4))
    # sampling is bounded and deterministic
    many = [torch.full((3, 2, 2), i / 100) for i in range(100)]
    a, b = median_image(many, max_samples=10, seed=7), median_image(many, max_samples=10, seed=7)
    assert torch.equal(a, b)
    with pytest.raises(ValueError):
        median_image([])
