"""Pointer-generator text head: copy the input sentences' tokens, not only generate them.

The ``generate`` head decodes every token of the next sentence from its vocabulary, given a sentence
latent: a word that was rare or absent in training cannot come out again, even when the right answer
is to repeat it (a name, a place). The ``pointer`` head (See et al., 2017, "Get To The Point") mixes,
at every decoding step t, the decoder's vocabulary distribution with an attention ``a_t`` over the
tokens of the K input sentences:

    P_t(w) = (1 - c_t) * P_vocab,t(w) + c_t * sum_{j : source_j = w} a_tj

``c_t`` (``pointer_copy_probability``) is a sigmoid of the decoder state, the attended source
encoding, the token fed at t and the continuation feature below. The head copies source token *ids*
(no extended vocabulary), so every id is copyable: ``[UNK]`` of a trained WordPiece vocabulary, a rare
bert-base-uncased piece, an unseen word split into characters.

Attention scores over the non-padding source tokens of all K sentences (one softmax):

- content: the decoder state (query) against a BiLSTM encoding of each input sentence (keys);
- continuation: how many of the tokens last fed to the decoder equal the source tokens just before
  position j (0..``max_match``), through a learned bias per length. It counts identities, not
  meanings, so a word never seen in training (pieces whose embeddings never trained) is copied piece
  after piece once its first piece is;
- which sentence: the log of the story's weights over the K input sentences (the copy path's
  sentence attention, ``text_copy_weights``; uniform without a copy path), so the shot to repeat is
  chosen from the story.

The decoder (the text autoencoder's LSTM and output layer) is unchanged, so a pretrained text
autoencoder is used as it is. The head returns log-probabilities, which are valid logits
(``log_softmax`` leaves them as they are): cross-entropy, token accuracy, greedy and nucleus decoding
read them like the generate head's logits.

On a GPU under bf16 autocast the source encoder (an LSTM) and the attention run in fp32
(``precision``: small score differences and the copy gate matter), and nothing in the head or in
:func:`swap_words` reads a value back to the host, so a step never waits for the GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .precision import autocast_off, run_fp32

TEXT_HEADS = ("generate", "pointer")
MAX_MATCH = 6
MAX_PIECES = 4


@dataclass
class TextCondition:
    """What the text decoder is given: the sentence latent ``[B,Dt]`` and, for a head that copies,
    the input sentences' tokens ``[B,K,L]`` and the story's weights over them ``[B,K]`` (``None``:
    uniform). Evaluation builds it for the model's prediction, a shuffled control and the floors."""

    latent: torch.Tensor
    source_tokens: torch.Tensor | None = None
    source_weights: torch.Tensor | None = None

    def permuted(self, order: torch.Tensor) -> TextCondition:
        """Row i gets window ``order[i]``'s condition, all of it (the shuffled-condition control)."""

        def pick(x):
            return None if x is None else x[order]

        return TextCondition(self.latent[order], pick(self.source_tokens), pick(self.source_weights))


@dataclass
class GeneratedText:
    """A decoded sentence per window. ``tokens[B,T]``: bos first, pad after eos. With the pointer head,
    per position t the step that produced ``tokens[:, t]``: ``pointer_copy_probability[B,T]`` (c_t)
    and ``pointer_attention[B,T,K,L]`` (a_t over the input sentences' tokens); both 0 at the bos and
    the padding."""

    tokens: torch.Tensor
    pointer_copy_probability: torch.Tensor | None = None
    pointer_attention: torch.Tensor | None = None


def advance_matches(run: torch.Tensor, token: torch.Tensor, source: torch.Tensor, pad_id: int, cap: int):
    """One decoding step of the continuation feature. ``run[B,K,L]``: for each source position j, how
    many of the tokens fed so far (ending with the previous one) equal the source tokens ending at
    j-1; ``token[B]`` is the token fed now. Runs stay inside a sentence and never match padding."""
    before = F.pad(source, (1, 0), value=pad_id)[..., :-1]  # the source token before each position
    shifted = F.pad(run, (1, 0))[..., :-1]  # the run that ended one position earlier
    equal = (before == token[:, None, None]) & (before != pad_id)
    return torch.where(equal, (shifted + 1).clamp(max=cap), torch.zeros_like(run))


def match_lengths(inputs: torch.Tensor, source: torch.Tensor, pad_id: int, cap: int = MAX_MATCH) -> torch.Tensor:
    """``[B,T,K,L]`` continuation feature for every teacher-forced step (``inputs[B,T]`` fed in order)."""
    run = torch.zeros_like(source)
    steps = []
    for t in range(inputs.shape[1]):
        run = advance_matches(run, inputs[:, t], source, pad_id, cap)
        steps.append(run)
    return torch.stack(steps, 1)


def swap_words(
    tokens: torch.Tensor,
    target: torch.Tensor,
    rate: float,
    vocab_size: int,
    *,
    pad_id: int,
    eos_id: int,
    keep: tuple[int, ...] = (),
    max_pieces: int = MAX_PIECES,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training aid for the pointer head (``model.pointer_word_swap``): in each window, every
    vocabulary id but padding, eos and ``keep`` is, with probability ``rate``, replaced by a random
    new word of 1..``max_pieces`` random ids (as WordPiece splits a word it never saw), alike in the
    window's input sentences ``tokens[B,K,L]`` and its target ``target[B,L]``. A sentence that grows
    past L is cut and ends in eos, as the loader cuts long ones.

    Why: in training every word is also predictable from the vocabulary, so nothing teaches the head
    to copy rather than generate, least of all to copy a run of pieces it has no meaning for; a
    swapped word can only be copied, piece after piece, as an unseen name at test time. The training
    step gives the swapped sentences to the pointer only (``source_tokens``): the frame encoders keep
    reading the true ones, so the story model and its image are trained on the data as it is (swapping
    what they read too cost the image 15-25% on the shapes stories)."""
    b, k, length = tokens.shape
    device = tokens.device
    rows = torch.cat([tokens, target[:, None]], 1)  # [B,K+1,L]: one mapping for the whole window
    ids = torch.arange(vocab_size, device=device)
    fixed_ids = sorted({int(pad_id), int(eos_id), *(int(i) for i in keep)})
    fixed = torch.zeros_like(ids, dtype=torch.bool)
    for i in fixed_ids:
        fixed |= ids == i
    swap = (torch.rand(b, vocab_size, device=device, generator=generator) < rate) & ~fixed
    # random ids that are never a fixed one: draw among the others, then step over each fixed id in
    # order (no boolean indexing: its size would have to be read back from the device)
    pieces = torch.randint(
        0, vocab_size - len(fixed_ids), (b, vocab_size, max_pieces), device=device, generator=generator
    )
    for i in fixed_ids:
        pieces += pieces >= i
    pieces[..., 0] = torch.where(swap, pieces[..., 0], ids)  # a kept id stands for itself
    count = torch.where(swap, torch.randint(1, max_pieces + 1, (b, vocab_size), device=device, generator=generator), 1)

    window = torch.arange(b, device=device)[:, None, None]
    n = count[window, rows].masked_fill(rows == pad_id, 0)  # [B,R,L] pieces per token (padding: re-added)
    slot = torch.arange(max_pieces, device=device)
    position = (n.cumsum(-1) - n)[..., None] + slot  # [B,R,L,P] where each piece lands
    lands = (slot < n[..., None]) & (position < length)
    out = torch.full((b, k + 1, length + 1), pad_id, dtype=tokens.dtype, device=device)
    out.scatter_(-1, torch.where(lands, position, length).flatten(2), pieces[window, rows].flatten(2))
    out = out[..., :length]
    out[..., -1] = torch.where(n.sum(-1) > length, eos_id, out[..., -1])
    return out[:, :k].contiguous(), out[:, k].contiguous()


@dataclass
class _Memory:
    tokens: torch.Tensor  # [B,S] source ids, S = K*L
    keys: torch.Tensor  # [B,S,H]
    values: torch.Tensor  # [B,S,E]
    bias: torch.Tensor  # [B,S]: log sentence weight; -inf where nothing may be copied
    any_valid: torch.Tensor  # [B]: the window has at least one copyable token


class PointerHead(nn.Module):
    """The copy half of a pointer-generator over a :class:`TextAutoencoder`'s decoder (module doc).

    Args:
        embed_dim, hidden_dim: the text autoencoder's embedding and decoder sizes.
        pad_id, bos_id: never attended (padding, and the start token that is never generated).
        max_match: the longest continuation the feature counts.
    """

    def __init__(self, embed_dim: int, hidden_dim: int, pad_id: int, bos_id: int, max_match: int = MAX_MATCH):
        super().__init__()
        self.pad_id, self.bos_id, self.max_match = int(pad_id), int(bos_id), int(max_match)
        half = max(1, hidden_dim // 2)
        self.source_encoder = nn.LSTM(embed_dim, half, batch_first=True, bidirectional=True)
        self.query = nn.Linear(hidden_dim, hidden_dim)
        self.key = nn.Linear(2 * half, hidden_dim)
        # Start by copying along: each further matched token multiplies a position's odds by e, and the
        # content query starts at zero. Left to learn both from zero, the head leaned on content (which
        # works for trained embeddings) and lost its place inside words it had no meaning for.
        self.match_bias = nn.Embedding(self.max_match + 1, 1)
        with torch.no_grad():
            self.match_bias.weight.copy_(torch.arange(self.max_match + 1, dtype=torch.float32)[:, None])
        nn.init.zeros_(self.query.weight)
        nn.init.zeros_(self.query.bias)
        self.copy_gate = nn.Linear(hidden_dim + 2 * half + embed_dim + self.max_match + 1, 1)

    # ------------------------------------------------------------------------------------------
    def memory(self, text, condition: TextCondition) -> _Memory:
        source = condition.source_tokens
        if source is None:
            raise ValueError("the pointer text head copies from the input sentences: give the condition source_tokens")
        b, k, length = source.shape
        # Unpacked on purpose: padding sits after each sentence and is masked out below; packing would
        # need the lengths on the host (a device sync) for a small gain in the backward direction.
        encoded, _ = run_fp32(self.source_encoder, text.embedding(source.flatten(0, 1)))
        encoded = encoded.reshape(b, k * length, -1)
        valid = (source != self.pad_id) & (source != self.bos_id)
        if condition.source_weights is None:
            prior = torch.zeros(b, k, device=source.device)
        else:
            prior = condition.source_weights.float().clamp_min(1e-6).log()
        bias = prior[:, :, None].expand(b, k, length).masked_fill(~valid, float("-inf"))
        with autocast_off(encoded):
            keys = self.key(encoded)
        return _Memory(source.reshape(b, -1), keys, encoded, bias.reshape(b, -1), valid.flatten(1).any(1))

    def mix(self, text, memory: _Memory, states: torch.Tensor, inputs: torch.Tensor, matches: torch.Tensor):
        """``states[B,T,H]`` (decoder outputs after ``inputs[B,T]``), ``matches[B,T,K,L]`` ->
        ``(log_probs[B,T,V], copy_probability[B,T], attention[B,T,S])``."""
        b, t = inputs.shape
        vocab = F.log_softmax(text.out(text.dropout(states)).float(), dim=-1)
        matches = matches.reshape(b, t, -1)
        with autocast_off(states):
            states = states.float()
            scores = torch.einsum("bth,bsh->bts", self.query(states), memory.keys) / math.sqrt(memory.keys.shape[-1])
            scores = scores + self.match_bias(matches).squeeze(-1) + memory.bias[:, None]
            attention = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a window with nothing to copy: all 0
            context = torch.einsum("bts,bse->bte", attention, memory.values)
            expected_match = torch.einsum("bts,btsm->btm", attention, F.one_hot(matches, self.max_match + 1).float())
            features = torch.cat([states, context, text.embedding(inputs).float(), expected_match], dim=-1)
            gate = self.copy_gate(features).squeeze(-1)
        gate = gate.masked_fill(~memory.any_valid[:, None], float("-inf"))  # nothing to copy: generate
        copied = torch.zeros_like(vocab).scatter_add_(-1, memory.tokens[:, None].expand(b, t, -1), attention)
        log_probs = torch.logaddexp(
            F.logsigmoid(-gate)[..., None] + vocab, F.logsigmoid(gate)[..., None] + copied.clamp_min(1e-30).log()
        )
        return log_probs, torch.sigmoid(gate), attention

    def teacher_forced(self, text, condition: TextCondition, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """``inputs = target[:, :-1]`` -> ``text_logits[B,T,V]`` (log-probabilities of ``target[:, 1:]``),
        ``pointer_copy_probability[B,T]`` and ``pointer_attention[B,T,K,L]``."""
        memory = self.memory(text, condition)
        states = text.decode_states(condition.latent, inputs)
        matches = match_lengths(inputs, condition.source_tokens, self.pad_id, self.max_match)
        log_probs, copy, attention = self.mix(text, memory, states, inputs, matches)
        return {
            "text_logits": log_probs,
            "pointer_copy_probability": copy,
            "pointer_attention": attention.view(*attention.shape[:2], *condition.source_tokens.shape[1:]),
        }

    def decoding(self, text, condition: TextCondition) -> PointerDecoding:
        return PointerDecoding(self, text, condition)


class PointerDecoding:
    """One generation's step function for ``TextAutoencoder.generate(step_logits=...)``: keeps the
    continuation feature up to date and records each step's copy probability and attention."""

    def __init__(self, head: PointerHead, text, condition: TextCondition):
        self.head, self.text = head, text
        self.source = condition.source_tokens
        self.memory = head.memory(text, condition)
        self.run = torch.zeros_like(self.source)
        self.copy: list[torch.Tensor] = []
        self.attention: list[torch.Tensor] = []

    def __call__(self, state: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        """``state[N,H]`` after feeding ``token[N]`` -> log-probabilities ``[N,V]`` of the next token."""
        self.run = advance_matches(self.run, token, self.source, self.head.pad_id, self.head.max_match)
        log_probs, copy, attention = self.head.mix(
            self.text, self.memory, state[:, None], token[:, None], self.run[:, None]
        )
        self.copy.append(copy[:, 0])
        self.attention.append(attention[:, 0])
        return log_probs[:, 0]

    def result(self, tokens: torch.Tensor) -> GeneratedText:
        """``tokens[N,T]`` from ``generate`` with this step function, and what each step did."""
        n, length = tokens.shape
        copy = tokens.new_zeros((n, length), dtype=torch.float32)
        attention = tokens.new_zeros((n, length, self.source.shape[1] * self.source.shape[2]), dtype=torch.float32)
        steps = len(self.copy)
        if steps:
            copy[:, 1 : steps + 1] = torch.stack(self.copy, 1)
            attention[:, 1 : steps + 1] = torch.stack(self.attention, 1)
        produced = tokens != self.head.pad_id
        produced[:, 0] = False
        copy = copy * produced
        attention = attention * produced[..., None]
        return GeneratedText(tokens, copy, attention.view(n, length, *self.source.shape[1:]))
