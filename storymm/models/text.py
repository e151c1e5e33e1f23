"""LSTM text autoencoder whose decoder cannot ignore the latent.

* The encoder runs on packed sequences, so padding never reaches the final state: the same sentence
  with more padding gives the same latent.
* The latent is ``Linear + LayerNorm`` (no ReLU).
* The decoder sees the latent twice: its initial state is computed from it, and the latent is
  concatenated to the input embedding at *every* step (the course decoder used it only as the initial
  state, which teacher forcing quickly learns to forget).
* On a GPU: the LSTMs run in fp32 even under bf16 autocast (``precision.run_fp32``), and the packed
  encoder takes its lengths from the host (:class:`HostLengths`, from the loader) so that no step
  waits for the GPU to read them back.

Token conventions: ``[bos] w1 ... wn [eos] [pad] ...``; ids come from the constructor, never from
constants here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from .precision import run_fp32


class HostLengths:
    """Non-pad token counts of sentences, held on the host (CPU int64).

    Packing sequences for the LSTM needs their lengths on the host; computing them from tokens that
    are already on the GPU means a copy back and a wait for the GPU at every step. The loader counts
    them (``token_lengths``/``target_lengths``) and they travel in this wrapper, not as a tensor
    argument, because DDP copies tensor arguments to the GPU."""

    __slots__ = ("counts",)

    def __init__(self, counts: torch.Tensor):
        self.counts = counts.to(device="cpu", dtype=torch.int64)

    def flat(self) -> torch.Tensor:
        return self.counts.reshape(-1)

    @staticmethod
    def cat(parts: list[HostLengths]) -> HostLengths:
        return HostLengths(torch.cat([part.flat() for part in parts]))


def pack_on_host_lengths(padded: torch.Tensor, lengths: torch.Tensor) -> PackedSequence:
    """``pack_padded_sequence(padded, lengths, batch_first=True, enforce_sorted=False)`` (the same
    operations, the same result) with the sort order sent to the device asynchronously: with
    ``lengths`` on the host nothing waits for the GPU."""
    lengths, order = torch.sort(lengths.to(torch.int64), descending=True)
    if padded.is_cuda:  # pinned, so the copy is truly asynchronous (a pageable one may wait)
        order = order.pin_memory()
    order = order.to(padded.device, non_blocking=True)
    packed = pack_padded_sequence(padded.index_select(0, order), lengths, batch_first=True, enforce_sorted=True)
    return PackedSequence(packed.data, packed.batch_sizes, order, None)


class TextAutoencoder(nn.Module):
    """``encode(tokens[N,L]) -> z[N,D]``; ``decode_logits(z, inputs[N,T]) -> logits[N,T,V]``.

    Args:
        vocab_size: tokenizer vocabulary size.
        latent_dim: size of the sentence latent.
        embed_dim: token embedding size (shared by encoder and decoder).
        hidden_dim: LSTM hidden size (the encoder is bidirectional, hidden_dim per direction).
        pad_id, bos_id, eos_id: special token ids of the tokenizer.
        num_layers: LSTM layers in encoder and decoder.
        dropout: dropout on embeddings and decoder outputs (0 disables).
    """

    def __init__(
        self,
        vocab_size: int,
        latent_dim: int = 64,
        embed_dim: int = 64,
        hidden_dim: int = 128,
        pad_id: int = 0,
        bos_id: int = 101,
        eos_id: int = 102,
        num_layers: int = 1,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.vocab_size = int(vocab_size)
        self.latent_dim = int(latent_dim)
        self.embed_dim = int(embed_dim)
        self.hidden_dim = int(hidden_dim)
        self.num_layers = int(num_layers)
        self.pad_id, self.bos_id, self.eos_id = int(pad_id), int(bos_id), int(eos_id)

        self.embedding = nn.Embedding(self.vocab_size, self.embed_dim, padding_idx=self.pad_id)
        self.dropout = nn.Dropout(dropout)
        # ---- encoder -------------------------------------------------------------------------
        self.encoder = nn.LSTM(
            self.embed_dim, self.hidden_dim, num_layers=self.num_layers, batch_first=True, bidirectional=True
        )
        self.to_latent = nn.Sequential(nn.Linear(2 * self.hidden_dim, self.latent_dim), nn.LayerNorm(self.latent_dim))
        # ---- decoder -------------------------------------------------------------------------
        self.init_state = nn.Linear(self.latent_dim, 2 * self.num_layers * self.hidden_dim)
        self.decoder = nn.LSTM(
            self.embed_dim + self.latent_dim, self.hidden_dim, num_layers=self.num_layers, batch_first=True
        )
        self.out = nn.Linear(self.hidden_dim, self.vocab_size)

    # ------------------------------------------------------------------------------------------
    def lengths(self, tokens: torch.Tensor) -> torch.Tensor:
        """Number of non-pad tokens per row (padding is at the end by contract), at least 1."""
        return (tokens != self.pad_id).sum(dim=1).clamp(min=1)

    def encode(self, tokens: torch.Tensor, lengths: HostLengths | None = None) -> torch.Tensor:
        """``tokens[N,L]`` int64 -> ``z[N,latent_dim]``.  Padding does not affect the result.
        ``lengths``: the rows' non-pad counts on the host (else counted here, a sync on a GPU)."""
        counts = lengths.flat() if lengths is not None else self.lengths(tokens).cpu()
        emb = self.dropout(self.embedding(tokens))
        packed = pack_on_host_lengths(emb, counts)
        _, (h, _) = run_fp32(self.encoder, packed)
        # h: [num_layers*2, N, hidden]; take the last layer's forward and backward final states.
        h_last = torch.cat([h[-2], h[-1]], dim=-1)
        return self.to_latent(h_last)

    def _initial_state(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.init_state(z).view(z.shape[0], 2, self.num_layers, self.hidden_dim)
        h0 = torch.tanh(s[:, 0]).transpose(0, 1).contiguous()
        c0 = s[:, 1].transpose(0, 1).contiguous()
        return h0, c0

    def _step_inputs(self, z: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        emb = self.dropout(self.embedding(inputs))
        zz = z.unsqueeze(1).expand(-1, inputs.shape[1], -1)
        return torch.cat([emb, zz], dim=-1)

    def decode_logits(self, z: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: ``inputs = target[:, :-1]`` -> logits for ``labels = target[:, 1:]``."""
        out, _ = run_fp32(self.decoder, self._step_inputs(z, inputs), self._initial_state(z))
        return self.out(self.dropout(out))

    @torch.no_grad()
    def generate(
        self,
        z: torch.Tensor,
        max_len: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Decode ``tokens[N,max_len]``: ``bos`` first, greedy if ``temperature == 0`` else nucleus
        sampling (``top_p``) at ``temperature``; everything after ``eos`` is ``pad``.  ``pad`` and ``bos``
        are never generated."""
        n = z.shape[0]
        out = torch.full((n, max_len), self.pad_id, dtype=torch.long, device=z.device)
        if max_len <= 0:
            return out
        out[:, 0] = self.bos_id
        state = self._initial_state(z)
        cur = out[:, :1]
        done = torch.zeros(n, dtype=torch.bool, device=z.device)
        banned = torch.tensor(sorted({self.pad_id, self.bos_id}), device=z.device)
        for t in range(1, max_len):
            h, state = run_fp32(self.decoder, self._step_inputs(z, cur), state)
            logits = self.out(h[:, -1]).float()
            logits[:, banned] = float("-inf")
            if temperature <= 0.0:
                nxt = logits.argmax(dim=-1)
            else:
                nxt = _nucleus_sample(logits / temperature, top_p, generator)
            nxt = torch.where(done, torch.full_like(nxt, self.pad_id), nxt)
            out[:, t] = nxt
            done = done | (nxt == self.eos_id)
            if bool(done.all()):
                break
            cur = nxt.unsqueeze(1)
        return out

    def forward(self, tokens: torch.Tensor, lengths: HostLengths | None = None) -> dict[str, torch.Tensor]:
        """Autoencode: ``dict(latent=[N,D], logits=[N,L-1,V])`` (logits predict ``tokens[:, 1:]``)."""
        z = self.encode(tokens, lengths)
        return {"latent": z, "logits": self.decode_logits(z, tokens[:, :-1])}


def _nucleus_sample(logits: torch.Tensor, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    probs = F.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        cum = sorted_p.cumsum(dim=-1)
        # keep the smallest prefix whose mass reaches top_p (always at least the top token)
        remove = (cum - sorted_p) >= top_p
        sorted_p = sorted_p.masked_fill(remove, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
    probs = probs / probs.sum(dim=-1, keepdim=True)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
