"""The pointer text head (models/pointer.py): it copies token ids, so it can say words it never saw in
training, where the generate head cannot; its features, its training aid and its place in the
sequence model (outputs, conditions, generation, configs)."""

from __future__ import annotations

import pytest
import torch

from storymm.config import ConfigError
from storymm.inference import predict_batch
from storymm.models import StoryContinuationModel, TextAutoencoder, TextCondition, VisualAutoencoder
from storymm.models.pointer import PointerHead, match_lengths, swap_words
from storymm.training.losses import LossWeights, sequence_loss, text_cross_entropy
from storymm.training.stages import TokenizerInfo, batch_loss_fn, build_model, loss_weights, unused_parameters

from small import small_config

# the special ids of a trained WordPiece vocabulary (storymm/data/tokenizer.py: [PAD] [UNK] [CLS] [SEP] [MASK])
PAD, UNK, BOS, EOS, VOCAB = 0, 1, 2, 3, 30
SEEN, UNSEEN = (5, 20), (20, VOCAB)  # training sentences use only SEEN ids


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: thread hand-offs cost more than they gain
    yield
    torch.set_num_threads(n)


def _sentences(n: int, ids: tuple[int, int], generator: torch.Generator, unk: bool = False) -> torch.Tensor:
    """``[n, 10]``: bos, 3-7 random words from ``ids`` (one of them [UNK] when ``unk``), eos, padding."""
    out = torch.full((n, 10), PAD)
    for i in range(n):
        words = int(torch.randint(3, 8, (1,), generator=generator))
        out[i, 0] = BOS
        out[i, 1 : words + 1] = torch.randint(*ids, (words,), generator=generator)
        if unk:
            out[i, int(torch.randint(1, words + 1, (1,), generator=generator))] = UNK
        out[i, words + 1] = EOS
    return out


def _train_repeater(head: str, steps: int = 150):
    """A text decoder taught to repeat its one input sentence (the latent is the sentence's encoding,
    as for the repeat floors), on sentences of SEEN ids only; the pointer with its training aid
    (``model.pointer_word_swap``), which renames words to random ids but never to [UNK]."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    text = TextAutoencoder(VOCAB, latent_dim=16, embed_dim=16, hidden_dim=32, pad_id=PAD, bos_id=BOS, eos_id=EOS)
    pointer = PointerHead(16, 32, PAD, BOS) if head == "pointer" else None
    params = list(text.parameters()) + (list(pointer.parameters()) if pointer else [])
    optimizer = torch.optim.Adam(params, lr=1e-2)
    for _ in range(steps):
        source = _sentences(32, SEEN, gen)
        if pointer:
            source = swap_words(
                source[:, None],
                source,
                0.3,
                VOCAB,
                pad_id=PAD,
                eos_id=EOS,
                keep=(UNK, BOS),
                max_pieces=1,
                generator=gen,
            )[1]
        condition = TextCondition(text.encode(source), source[:, None])
        if pointer:
            logits = pointer.teacher_forced(text, condition, source[:, :-1])["text_logits"]
        else:
            logits = text.decode_logits(condition.latent, source[:, :-1])
        loss = text_cross_entropy(logits, source[:, 1:], PAD)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return text.eval(), pointer.eval() if pointer else None


def _repeat(text, pointer, source: torch.Tensor):
    condition = TextCondition(text.encode(source), source[:, None])
    with torch.no_grad():
        if pointer is None:
            return text.generate(condition.latent, source.shape[1]), None
        decoding = pointer.decoding(text, condition)
        tokens = text.generate(condition.latent, source.shape[1], step_logits=decoding)
        return tokens, decoding.result(tokens)


def test_pointer_repeats_words_never_seen_in_training_and_unk_where_generate_cannot():
    """Trained on sentences of SEEN ids, the pointer repeats sentences of UNSEEN ids with an [UNK]
    (an id no training sentence ever held) exactly; the generate head, trained on the same sentences,
    says none of those ids."""
    text, pointer = _train_repeater("pointer")
    source = _sentences(64, UNSEEN, torch.Generator().manual_seed(1), unk=True)
    tokens, result = _repeat(text, pointer, source)
    words = (source != PAD) & (source != BOS) & (source != EOS)
    said = (tokens == source)[words].float().mean().item()
    said_unk = (tokens == source)[source == UNK].float().mean().item()
    exact = (tokens == source).all(1).float().mean().item()
    # (the misses are mostly an id that occurs twice in a sentence of 10 possible ids: which one next)
    assert said > 0.9 and said_unk > 0.9 and exact > 0.5, (said, said_unk, exact, tokens[:4], source[:4])
    # it said them by copying: high copy probability, attention on the same word of the input sentence
    assert result.pointer_copy_probability[words].mean() > 0.8
    attended = result.pointer_attention[:, :, 0].argmax(-1)  # [N,T] source position per step
    assert (attended[words] == torch.nonzero(words)[:, 1]).float().mean() > 0.85
    assert (result.pointer_copy_probability[:, 0] == 0).all() and (result.pointer_attention[tokens == PAD] == 0).all()

    text, _ = _train_repeater("generate")
    tokens, _ = _repeat(text, None, source)
    said = (tokens[:, 1:, None] == torch.arange(*UNSEEN)).any(-1) | (tokens[:, 1:] == UNK)
    assert said.float().mean() < 0.02, tokens[:4]


def test_match_lengths_count_the_copied_run_inside_each_sentence():
    source = torch.tensor([[[BOS, 7, 8, 9, EOS, PAD], [BOS, 8, 9, 7, EOS, PAD]]])  # [1,K=2,L=6]
    inputs = torch.tensor([[BOS, 7, 8, 9, PAD]])  # the decoder has been fed bos 7 8 9 pad
    m = match_lengths(inputs, source, PAD, cap=3)[0]  # [T,K,L]
    assert m[0].tolist() == [[0, 1, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0]]  # after bos: each first word
    assert m[1].tolist() == [[0, 0, 2, 0, 0, 0], [0, 0, 0, 0, 1, 0]]  # "bos 7" continues in sentence 0
    assert m[2].tolist() == [[0, 0, 0, 3, 0, 0], [0, 0, 1, 0, 0, 0]]
    assert m[3].tolist() == [[0, 0, 0, 0, 3, 0], [0, 0, 0, 2, 0, 0]]  # capped at 3
    assert m[4].tolist() == [[0] * 6, [0] * 6]  # padding never matches


def test_swap_words_renames_a_word_alike_in_inputs_and_target_as_new_pieces():
    gen = torch.Generator().manual_seed(0)
    tokens = _sentences(48, SEEN, gen).view(16, 3, 10)
    target = tokens[:, 1].clone()
    options = {"pad_id": PAD, "eos_id": EOS, "keep": (BOS,), "generator": gen}
    same_t, same_y = swap_words(tokens, target, 0.0, VOCAB, **options)
    assert torch.equal(same_t, tokens) and torch.equal(same_y, target)
    new_t, new_y = swap_words(tokens, target, 0.5, VOCAB, **options)
    assert torch.equal(new_y, new_t[:, 1])  # the target was renamed exactly like its copy among the inputs
    assert (new_t[..., 0] == BOS).all() and not (new_t[..., 1:] == BOS).any()  # specials stay, none appear
    assert ((new_t == EOS).sum(-1) == 1).all() and ((new_t != PAD).sum(-1) >= (tokens != PAD).sum(-1)).all()
    longer = (new_t != PAD).sum(-1) > (tokens != PAD).sum(-1)
    assert longer.float().mean() > 0.3  # words became several pieces
    cut = new_t[..., -1] != PAD
    assert (new_t[..., -1][cut] == EOS).all()  # a sentence grown past L ends in eos
    # one mapping per window: a sentence that occurs twice in a window is renamed twice alike
    twin = tokens.clone()
    twin[:, 2] = twin[:, 0]
    renamed, _ = swap_words(twin, target, 0.5, VOCAB, **options)
    assert torch.equal(renamed[:, 2], renamed[:, 0]) and not torch.equal(renamed, twin)


def _story_model(text_head: str = "pointer", copy_path: bool = True) -> StoryContinuationModel:
    text = TextAutoencoder(VOCAB, latent_dim=16, embed_dim=16, hidden_dim=32, pad_id=PAD, bos_id=BOS, eos_id=EOS)
    visual = VisualAutoencoder(latent_dim=16, image_size=(16, 24), channels=(8, 16))
    return StoryContinuationModel(visual, text, hidden_dim=32, copy_path=copy_path, text_head=text_head)


@pytest.mark.parametrize("copy_path", [True, False])
def test_sequence_model_with_the_pointer_head(copy_path):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    b, k = 3, 4
    tokens = _sentences(b * k, SEEN, gen).view(b, k, 10)
    target = tokens[:, -2].clone()
    frames = torch.rand(b, k, 3, 16, 24)
    m = _story_model(copy_path=copy_path)
    out = m(frames, tokens, target, torch.rand(b, 3, 16, 24))
    assert out["text_logits"].shape == (b, 9, VOCAB)
    assert torch.allclose(out["text_logits"].exp().sum(-1), torch.ones(b, 9), atol=1e-5)  # log-probabilities
    assert out["pointer_copy_probability"].shape == (b, 9)
    assert out["pointer_attention"].shape == (b, 9, k, 10)
    assert torch.allclose(out["pointer_attention"].sum((-1, -2)), torch.ones(b, 9), atol=1e-5)
    assert (out["pointer_attention"][tokens[:, None].expand(-1, 9, -1, -1) == PAD] == 0).all()

    condition = m.text_condition(out, tokens)
    assert torch.equal(condition.source_tokens, tokens)
    assert torch.allclose(m.text_logits(condition, target), out["text_logits"])
    order = torch.tensor([1, 2, 0])
    shuffled = m.text_logits(condition.permuted(order), target)
    assert not torch.allclose(shuffled, out["text_logits"])
    with pytest.raises(ValueError, match="source_tokens"):
        m.text_logits(out["text_latent"], target)  # a bare latent has nothing to copy from
    floor = m.sentence_condition(tokens[:, -2])  # the repeat floor: that sentence alone
    assert torch.equal(floor.source_tokens, tokens[:, -2:-1]) and floor.source_weights is None

    m.eval()
    result = m.continue_text(frames, tokens, max_len=7)
    assert result.tokens.shape == (b, 7) and (result.tokens[:, 0] == BOS).all()
    assert result.pointer_copy_probability.shape == (b, 7) and result.pointer_attention.shape == (b, 7, k, 10)
    assert torch.equal(m.generate_text(frames, tokens, max_len=7), result.tokens)
    # evaluate and predict generate through predict_batch: the same sentence, the pointer's details
    predicted = predict_batch(m, {"frames": frames, "tokens": tokens}, 7)
    assert torch.equal(predicted.tokens, result.tokens)
    assert torch.equal(predicted.token_details["pointer_copy_probability"], result.pointer_copy_probability)
    assert torch.equal(predicted.token_details["pointer_attention"], result.pointer_attention)


def test_pointer_story_gradient_sets_the_share_of_its_cross_entropy_the_story_model_gets():
    """``model.pointer_story_gradient`` scales the gradient the pointer's cross-entropy sends into the
    GRU, the fusion, the visual encoder and the text-latent projection that the image shares: 1 all of
    it, 0.5 half of it, 0 (the default) none; the text side (pointer, decoder, the sentence attention
    that picks the shot to repeat) gets all of it at every share, and the cross-entropy's value is the
    same to the bit."""
    gen = torch.Generator().manual_seed(0)
    b, k = 3, 4
    tokens = _sentences(b * k, SEEN, gen).view(b, k, 10)
    target, frames = tokens[:, -2].clone(), torch.rand(b, k, 3, 16, 24)
    torch.manual_seed(0)
    m = _story_model()
    shared = ("gru.", "fusion.", "visual.", "to_text.")
    text_side = ("pointer.", "text.decoder", "text_attention.")
    values, grads = {}, {}
    for share in (1.0, 0.5, 0.0):
        m.pointer_story_gradient = share
        m.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        ce = text_cross_entropy(m(frames, tokens, target)["text_logits"], target[:, 1:], PAD)
        ce.backward()
        values[share] = ce.detach()
        grads[share] = {
            name: torch.zeros_like(p) if p.grad is None else p.grad.clone() for name, p in m.named_parameters()
        }
    assert torch.equal(values[1.0], values[0.5]) and torch.equal(values[1.0], values[0.0])
    for prefix in shared + text_side:
        names = [name for name in grads[1.0] if name.startswith(prefix)]
        assert names and any(grads[1.0][n].abs().sum() > 0 for n in names), prefix
        if prefix == "text_attention.":  # through the copy weights at every share, the latent's share besides
            assert any(grads[0.0][n].abs().sum() > 0 for n in names), prefix
            continue
        for name in names:
            full = grads[1.0][name]
            if prefix in text_side:
                for share in (0.5, 0.0):
                    torch.testing.assert_close(grads[share][name], full, rtol=1e-4, atol=1e-7)
            else:
                torch.testing.assert_close(grads[0.5][name], 0.5 * full, rtol=1e-4, atol=1e-7)
                assert not grads[0.0][name].any(), name


@pytest.mark.parametrize("copy_path", [True, False])
def test_pointer_generate_loss_teaches_the_story_model_as_the_generate_head_does(copy_path):
    """With the defaults (``pointer_story_gradient`` 0, ``pointer_generate_loss`` 1) the story model
    (GRU, fusion, visual encoder, text-latent projection) gets, from the pointer head's text loss, the
    gradient the generate head's loss gives the same weights, to float tolerance: the generate head's
    cross-entropy of the true sentence on the same latent; the pointer's own cross-entropy trains the
    pointer and reaches no story parameter. Off (0), the story model gets no text gradient at all."""
    gen = torch.Generator().manual_seed(0)
    b, k = 3, 4
    tokens = _sentences(b * k, SEEN, gen).view(b, k, 10)
    target, frames = tokens[:, -2].clone(), torch.rand(b, k, 3, 16, 24)
    batch = {"frames": frames, "tokens": tokens, "target_tokens": target, "target_frame": torch.rand(b, 3, 16, 24)}
    text_only = {"l1": 0.0, "gradient": 0.0, "context": 0.0, "alignment": 0.0, "text": 1.0}
    torch.manual_seed(0)
    pointer = _story_model("pointer", copy_path=copy_path).eval()  # eval: no dropout, the same decoder twice
    assert pointer.pointer_story_gradient == 0.0 and pointer.pointer_generate_loss
    generate = _story_model("generate", copy_path=copy_path).eval()
    generate.load_state_dict({k: v for k, v in pointer.state_dict().items() if not k.startswith("pointer.")})

    def grads(model, weights):
        model.zero_grad(set_to_none=True)
        outputs = model(frames, tokens, target, batch["target_frame"])
        total, terms = sequence_loss(outputs, batch, weights, PAD)
        total.backward()
        return (
            outputs,
            terms,
            {n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        )

    outputs, terms, with_generate = grads(pointer, LossWeights(**text_only, generate_text=1.0))
    reference, _, generate_grads = grads(generate, LossWeights(**text_only))
    torch.testing.assert_close(outputs["generate_text_logits"], reference["text_logits"])
    assert terms["generate_text"] > terms["text"]  # the pointer copies what the vocabulary alone cannot
    story = [n for n in generate_grads if n.startswith(("gru.", "fusion.", "visual.", "to_text."))]
    assert any(generate_grads[n].abs().sum() > 0 for n in story)
    for name in story:
        torch.testing.assert_close(with_generate[name], generate_grads[name], rtol=1e-4, atol=1e-7)
    assert any(with_generate[n].abs().sum() > 0 for n in with_generate if n.startswith("pointer."))

    pointer.pointer_generate_loss = False  # the pointer's loss alone, with share 0: no text gradient in the story
    outputs, _, without = grads(pointer, LossWeights(**text_only, generate_text=1.0))
    assert "generate_text_logits" not in outputs
    assert all(not without[n].any() for n in story)


def test_generate_head_is_unchanged_and_keeps_its_checkpoint_keys():
    torch.manual_seed(0)
    generate = _story_model("generate")
    assert not any(key.startswith("pointer.") for key in generate.state_dict())
    pointer = _story_model("pointer")
    extra = set(pointer.state_dict()) - set(generate.state_dict())
    assert extra and all(key.startswith("pointer.") for key in extra)
    names = [name for name, _ in pointer.named_parameters()]
    assert names[: len(list(generate.parameters()))] == [name for name, _ in generate.named_parameters()]
    result = generate.continue_text(
        torch.rand(2, 4, 3, 16, 24), _sentences(8, SEEN, torch.Generator()).view(2, 4, 10), 5
    )
    assert result.pointer_copy_probability is None and result.pointer_attention is None
    with pytest.raises(ValueError, match="unknown text head"):
        _story_model("quote")


def test_pointer_config_reaches_every_parameter_and_is_validated():
    tokens = TokenizerInfo(VOCAB, PAD, BOS, EOS)
    config = small_config("model.text_head=pointer", "model.pointer_word_swap=0.2")
    model = build_model("sequence", config, tokens)
    assert model.text_head == "pointer" and model.pointer_story_gradient == 0.0 and model.pointer_generate_loss
    assert loss_weights(config).generate_text == 1.0
    assert unused_parameters("sequence", config, tokens, model) == []
    for share in (0.0, 0.5, 1.0):
        shared_config = small_config(
            "model.text_head=pointer", f"model.pointer_story_gradient={share}", "model.pointer_generate_loss=0"
        )
        shared = build_model("sequence", shared_config, tokens)
        assert shared.pointer_story_gradient == share and not shared.pointer_generate_loss
        assert loss_weights(shared_config).generate_text == 0.0
        # with no share and no generate loss the latent terms still reach to_text
        assert unused_parameters("sequence", shared_config, tokens, shared) == []
    generate_config = small_config("model.text_head=generate")
    assert loss_weights(generate_config).generate_text == 0.0
    assert not build_model("sequence", generate_config, tokens).pointer_generate_loss
    with pytest.raises(ConfigError, match="model.text_head"):
        small_config("model.text_head=copy")
    with pytest.raises(ConfigError, match="model.pointer_word_swap"):
        small_config("model.pointer_word_swap=1.5")
    with pytest.raises(ConfigError, match="model.pointer_story_gradient"):
        small_config("model.pointer_story_gradient=2")
    with pytest.raises(ConfigError, match="model.pointer_generate_loss"):
        small_config("model.pointer_generate_loss=-1")
    # a run recorded with the boolean this share replaced loads as it trained
    assert small_config("model.pointer_trains_story=false").model.pointer_story_gradient == 0.0
    assert small_config("model.pointer_trains_story=true").model.pointer_story_gradient == 1.0


def test_training_step_swaps_words_for_the_pointer_only():
    """With ``model.pointer_word_swap`` the training step hands the swapped sentences to the pointer
    (``source_tokens``) and as the sentence the text head is taught (``text_target_tokens``), while
    the frame encoders and the target latent read the true ones; validation and evaluation (eval
    mode) swap nothing."""
    tokens_info = TokenizerInfo(VOCAB, PAD, BOS, EOS)
    config = small_config(
        "model.text_head=pointer", "model.pointer_word_swap=0.5", "data.image_height=16", "data.image_width=24"
    )
    model = build_model("sequence", config, tokens_info)
    seen: list[dict] = []
    model.register_forward_pre_hook(lambda _m, args, kwargs: seen.append({"args": args, **kwargs}), with_kwargs=True)
    gen = torch.Generator().manual_seed(0)
    k = config.data.context_frames
    tokens = _sentences(4 * k, SEEN, gen).view(4, k, 10)
    batch = {
        "frames": torch.rand(4, k, 3, 16, 24),
        "tokens": tokens,
        "target_tokens": tokens[:, -2].clone(),
        "target_frame": torch.rand(4, 3, 16, 24),
    }
    loss_fn = batch_loss_fn("sequence", config, tokens_info)
    torch.manual_seed(0)
    loss_fn(model.train(), batch)
    call = seen.pop()
    assert torch.equal(call["args"][1], tokens)  # the frame encoders read the true sentences
    assert torch.equal(call["args"][2], batch["target_tokens"])  # and the target latent the true target
    source, taught = call["source_tokens"], call["text_target_tokens"]
    assert not torch.equal(source, tokens) and torch.equal(taught, source[:, -2])  # renamed alike
    loss_fn(model.eval(), batch)
    call = seen.pop()
    assert "source_tokens" not in call and "text_target_tokens" not in call
    assert torch.equal(call["args"][2], batch["target_tokens"])
