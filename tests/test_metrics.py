"""Metrics against small hand-computed cases, and the key property: sharded == single process."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch

from storymm.evaluation.metrics import EvalAccumulator, median_image, retrieval_recall, ssim_window

H, W = 8, 10


def _batch(b=4, seed=0, *, pred=None, target=None, last=None, latents=True, dim=16, sentences=None, k=3):
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(b, 3, H, W, generator=g) if target is None else target
    pred = torch.rand(b, 3, H, W, generator=g) if pred is None else pred
    last = torch.rand(b, 3, H, W, generator=g) if last is None else last
    inputs = torch.cat([torch.rand(b, k - 1, 3, H, W, generator=g), last.unsqueeze(1)], dim=1)
    vis = torch.randn(b, dim, generator=g) if latents else None
    txt = torch.randn(b, dim, generator=g) if latents else None
    hyps, refs = sentences if sentences is not None else ([], [])
    return dict(
        pred_image=pred,
        target_image=target,
        last_input=last,
        inputs=inputs,
        text_ce_sum_true=float(torch.rand(1, generator=g)) * 30,
        text_ce_sum_shuffled=float(torch.rand(1, generator=g)) * 40,
        text_ce_sum_copy_last=float(torch.rand(1, generator=g)) * 40,
        text_ce_sum_copy_two_back=float(torch.rand(1, generator=g)) * 40,
        text_tokens=int(torch.randint(5, 20, (1,), generator=g)),
        visual_latent=vis,
        text_latent=txt,
        hypotheses=hyps,
        references=refs,
        copy_last_sentences=list(reversed(refs)),
        copy_two_back_sentences=list(refs[1:] + refs[:1]),
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
    want = np.mean([structural_similarity(p[i], t[i], data_range=1.0, channel_axis=-1, win_size=7) for i in range(2)])
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


def _const(*values) -> torch.Tensor:
    """``[len(values),3,H,W]`` images, each one constant value."""
    return torch.stack([torch.full((3, H, W), float(v), dtype=torch.float64) for v in values])


def test_input_floors_exact():
    # inputs (oldest..last) 0.1, 0.5, 0.6 for both windows; targets 0.45 and 0.95
    inputs = _const(0.1, 0.5, 0.6).unsqueeze(0).repeat(2, 1, 1, 1, 1)
    target = _const(0.45, 0.95)
    b = _batch(2, target=target, pred=target.clone(), last=inputs[:, -1])
    b["inputs"] = inputs
    acc = EvalAccumulator()
    acc.update(**b)
    f = acc.compute()["floors"]
    # copy last 0.6: errors .15, .35
    assert f["copy_last_l1"] == pytest.approx(0.25, abs=1e-12)
    # two back 0.5: errors .05, .45
    assert f["copy_two_back_l1"] == pytest.approx(0.25, abs=1e-12)
    assert f["copy_two_back_mse"] == pytest.approx((0.05**2 + 0.45**2) / 2, abs=1e-12)
    # mean of inputs 0.4: errors .05, .55
    assert f["mean_of_inputs_l1"] == pytest.approx(0.3, abs=1e-12)
    assert f["mean_of_inputs_mse"] == pytest.approx((0.05**2 + 0.55**2) / 2, abs=1e-12)
    # oracle: window 0 picks 0.5 (error .05), window 1 picks 0.6 (error .35)
    assert f["best_input_oracle_l1"] == pytest.approx(0.2, abs=1e-12)
    assert f["best_input_oracle_mse"] == pytest.approx((0.05**2 + 0.35**2) / 2, abs=1e-12)
    from skimage.metrics import structural_similarity

    def ssim(a, t):
        return structural_similarity(
            np.full((H, W, 3), a), np.full((H, W, 3), t), data_range=1.0, channel_axis=-1, win_size=7
        )

    assert f["best_input_oracle_ssim"] == pytest.approx((ssim(0.5, 0.45) + ssim(0.6, 0.95)) / 2, rel=1e-9)
    assert f["copy_two_back_ssim"] == pytest.approx((ssim(0.5, 0.45) + ssim(0.5, 0.95)) / 2, rel=1e-9)
    # no model that copies an input beats the oracle; the oracle is at most every single input's error
    assert f["best_input_oracle_l1"] <= min(f["copy_last_l1"], f["copy_two_back_l1"])


def test_oracle_ties_pick_the_latest_input_and_one_input_has_no_two_back():
    target = _const(0.5)
    uniform = torch.full((1, 3, H, W), 0.6, dtype=torch.float64)  # L1 0.1, MSE 0.01
    striped = torch.full((1, 3, H, W), 0.5, dtype=torch.float64)
    striped[..., ::2] = 0.7  # W even: half the values off by 0.2 -> L1 0.1, MSE 0.02
    for order, mse in (((uniform, striped), 0.02), ((striped, uniform), 0.01)):
        b = _batch(1, target=target, last=order[1])
        b["inputs"] = torch.stack(order, dim=1)
        acc = EvalAccumulator()
        acc.update(**b)
        f = acc.compute()["floors"]
        assert f["best_input_oracle_l1"] == pytest.approx(0.1, abs=1e-12)
        assert f["best_input_oracle_mse"] == pytest.approx(mse, abs=1e-12)
    b = _batch(1, target=target, k=1)
    acc = EvalAccumulator()
    acc.update(**b)
    f = acc.compute()["floors"]
    assert f["copy_two_back_l1"] is None and f["copy_two_back_ssim"] is None
    assert f["best_input_oracle_l1"] == pytest.approx(f["copy_last_l1"], abs=1e-12)
    b = _batch(1, target=target)
    b["inputs"] = None  # callers that give only the last frame keep working; the new floors are None
    acc = EvalAccumulator()
    acc.update(**b)
    f = acc.compute()["floors"]
    assert f["best_input_oracle_l1"] is None and f["mean_of_inputs_l1"] is None and f["copy_last_l1"] > 0


def test_text_floors_and_retrieval_chance():
    refs = [
        "the red square moves left",
        "a blue circle rises slowly",
        "the green star spins in place",
        "an orange box falls down",
    ]
    acc = EvalAccumulator()
    b = _batch(4, sentences=(list(refs), list(refs)))
    b.update(
        text_ce_sum_true=6.0,
        text_ce_sum_copy_last=12.0,
        text_ce_sum_copy_two_back=9.0,
        text_tokens=3,
        copy_two_back_sentences=list(refs),
        copy_last_sentences=["stock prices fell on monday"] * 4,
    )
    acc.update(**b)
    b = _batch(2, sentences=(refs[:2], refs[:2]))
    b.update(
        text_ce_sum_true=4.0,
        text_ce_sum_copy_last=3.0,
        text_ce_sum_copy_two_back=1.0,
        text_tokens=2,
        copy_two_back_sentences=refs[:2],
        copy_last_sentences=["stock prices fell on monday"] * 2,
    )
    acc.update(**b)
    f = acc.compute()["floors"]
    assert f["text_ce_copy_last"] == pytest.approx(15.0 / 5)  # pooled over tokens
    assert f["text_ce_copy_two_back"] == pytest.approx(10.0 / 5)
    assert f["bleu_copy_two_back"] == pytest.approx(1.0)
    assert f["bleu_copy_last"] < 0.1
    assert f["retrieval_r1_chance"] == pytest.approx(1 / 6) and f["retrieval_r10_chance"] == 1.0
    # a batch without the copy condition makes that CE floor unknown rather than wrong
    b = _batch(1)
    b["text_ce_sum_copy_last"] = None
    acc.update(**b)
    assert acc.compute()["floors"]["text_ce_copy_last"] is None
    acc = EvalAccumulator()
    acc.update(**_batch(3, latents=False))
    assert acc.compute()["floors"]["retrieval_r1_chance"] is None
