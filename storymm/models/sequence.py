"""Story continuation: K (image, sentence) frames in, the next image and sentence out.

    frames[B,K,3,H,W] --visual.encode--> v[B,K,Dv] \
                                                    fusion --> f[B,K,Hd] --GRU--> o[B,K,Hd]
    tokens[B,K,L]     --text.encode----> t[B,K,Dt] /
    attention pooling over o (weights ``attention[B,K]``) -> pooled; ctx = [pooled; o_K]
    ctx --Linear+LayerNorm--> visual_latent[B,Dv] --visual.decode--> image, context
    ctx --Linear+LayerNorm--> text_latent[B,Dt]   --text.decode_logits(., target[:, :-1])--> text_logits

The projections end in LayerNorm (no ReLU), matching the autoencoders' latents, so the pretrained
decoders see inputs on the scale they were trained on.  The text logits are conditioned on the
*predicted* text latent only (nothing else reaches the text decoder), so shuffling that latent across
the batch must raise the cross-entropy if the model uses the story at all.

Optional copy path (``copy_path=True``): a query from ``ctx`` attends over the K input frames (keys
from the GRU outputs, the frame latents and a learned "frames back from the last" embedding), the
attention-weighted mix of the input images is the copied image, and a per-pixel sigmoid gate (a small
conv over [generated, copied] plus a per-image bias from ``ctx``) blends it with the generated image.
With A-B-A-B editing the right frame to copy is often two back; this is how the model can learn it.
``image_head="warp"`` (``models/motion.py``) first warps every input frame by a predicted translation
and zoom (motion estimated from correlations between the input frames), so the attended frame is
moved to where the story will be; ``"copy"`` (the default, and the ablation) copies frames as they are.
The same path exists for text: a second query attends over the input sentences' latents, and a
sigmoid gate from ``ctx`` blends the attended sentence latent with the generated one. A pretrained
text autoencoder decodes an input sentence's latent back into that sentence, so the model can reuse
the sentence two frames back and only has to learn what changes.

Text heads (``text_head``): ``"generate"`` (the default) decodes every token from the vocabulary;
``"pointer"`` (``models/pointer.py``) also copies tokens of the K input sentences at every step, so
words never seen in training (names, places) come out by repeating them. With the pointer, the story
model (GRU, fusion, encoders) still learns text from the generate head's cross-entropy on the same
latent (``generate_text_logits``), not from the pointer's: the image it shares stays as good as under
the generate head (docs/variants.md). Everything the text decoder
is given travels as one :class:`TextCondition` (latent; input sentences and their weights for the
pointer), so evaluation conditions the model, a shuffled control and the repeat floors the same way
whatever the head.

Variants (``docs/variants.md``): ``tag_vocab > 0`` adds the frame's hashed objects/actions/locations
tags (``tags[B,K,T]``, 0 = padding, from ``WindowLoader(tag_vocab=...)``) as an extra input embedding:
the mean of the tags' embeddings, through a zero-initialised Linear, is added to the fused frame vector
before the GRU.  A visual autoencoder built with ``skips=True`` decodes the predicted latent with skip
connections from the encoder features of the last input frame (see ``models/visual.py``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .fusion import build_fusion
from .motion import MotionWarp
from .pointer import TEXT_HEADS, GeneratedText, PointerHead, TextCondition
from .precision import run_fp32
from .text import HostLengths, TextAutoencoder
from .visual import VisualAutoencoder

IMAGE_HEADS = ("copy", "warp")


class FrameAttention(nn.Module):
    """Where to look among the K input frames: a query from the story context against keys made of
    each frame's GRU output and latent, plus an embedding of how many frames back it is (so "two
    back", the A-B-A-B shot, is learnable). The copy path asks it twice: which input image to copy
    and which input sentence."""

    def __init__(self, context_dim: int, hidden_dim: int, latent_dim: int, max_frames: int):
        super().__init__()
        self.hidden_dim = hidden_dim
        self.query = nn.Linear(context_dim, hidden_dim)
        self.key = nn.Linear(hidden_dim + latent_dim, hidden_dim)
        self.position = nn.Embedding(max_frames, hidden_dim)  # index = frames back from the last

    def scores(self, context: torch.Tensor, gru_out: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """``[B,K]`` scaled dot-product scores (before the softmax)."""
        k = latents.shape[1]
        if k > self.position.num_embeddings:
            raise ValueError(f"copy path supports at most {self.position.num_embeddings} input frames, got {k}")
        back = torch.arange(k - 1, -1, -1, device=latents.device)
        keys = self.key(torch.cat([gru_out, latents], dim=-1)) + self.position(back)
        return torch.einsum("bh,bkh->bk", self.query(context), keys) / math.sqrt(self.hidden_dim)


#: Parameter names before the two copy attentions became :class:`FrameAttention` modules; old
#: checkpoints load through this map (the parameter order, which optimiser states rely on, is kept).
_OLD_ATTENTION_KEYS = {
    "copy_query.": "image_attention.query.",
    "copy_key.": "image_attention.key.",
    "copy_pos.": "image_attention.position.",
    "text_copy_query.": "text_attention.query.",
    "text_copy_key.": "text_attention.key.",
    "text_copy_pos.": "text_attention.position.",
}


def _rename_old_attention_keys(module, state_dict, prefix, *args) -> None:
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix) :]
        for old, new in _OLD_ATTENTION_KEYS.items():
            if rest.startswith(old):
                state_dict[prefix + new + rest[len(old) :]] = state_dict.pop(key)
                break


def _gradient_share(x: torch.Tensor, share: float) -> torch.Tensor:
    """``x`` unchanged going forward (to the bit), its gradient multiplied by ``share`` going back."""
    if share == 0.0:
        return x.detach()
    frozen = x.detach()
    return frozen + share * (x - frozen)


class StoryContinuationModel(nn.Module):
    def __init__(
        self,
        visual: VisualAutoencoder,
        text: TextAutoencoder,
        fusion: str = "gate",
        hidden_dim: int = 128,
        copy_path: bool = False,
        max_frames: int = 64,
        tag_vocab: int = 0,
        image_head: str = "copy",
        context_frames: int = 4,
        text_head: str = "generate",
        pointer_story_gradient: float = 0.0,
        pointer_generate_loss: bool = True,
    ):
        super().__init__()
        self.visual = visual
        self.text = text
        self.fusion_name = fusion
        self.hidden_dim = int(hidden_dim)
        self.copy_path = bool(copy_path)
        if image_head not in IMAGE_HEADS:
            raise ValueError(f"unknown image head {image_head!r} (choose from {', '.join(IMAGE_HEADS)})")
        if image_head == "warp" and not self.copy_path:
            raise ValueError("image_head 'warp' warps the frames the copy path attends to: it needs copy_path")
        self.image_head = image_head
        if text_head not in TEXT_HEADS:
            raise ValueError(f"unknown text head {text_head!r} (choose from {', '.join(TEXT_HEADS)})")
        self.text_head = text_head
        if not 0.0 <= pointer_story_gradient <= 1.0:
            raise ValueError(f"pointer_story_gradient must lie in [0, 1], got {pointer_story_gradient}")
        self.pointer_story_gradient = float(pointer_story_gradient)
        self.pointer_generate_loss = bool(pointer_generate_loss) and text_head == "pointer"
        self.autoencoders_frozen = False
        dv, dt, hd = visual.latent_dim, text.latent_dim, self.hidden_dim

        self.fusion = build_fusion(fusion, dv, dt, hd)
        self.gru = nn.GRU(hd, hd, batch_first=True)
        self.attn_proj = nn.Linear(hd, hd)
        self.attn_score = nn.Linear(hd, 1, bias=False)
        self.to_visual = nn.Sequential(nn.Linear(2 * hd, dv), nn.LayerNorm(dv))
        self.to_text = nn.Sequential(nn.Linear(2 * hd, dt), nn.LayerNorm(dt))
        self.tag_vocab = int(tag_vocab)
        if self.tag_vocab:
            self.tag_embed = nn.Embedding(self.tag_vocab, hd, padding_idx=0)
            self.tag_proj = nn.Linear(hd, hd)
            nn.init.zeros_(self.tag_proj.weight)  # starts as the model without tags
            nn.init.zeros_(self.tag_proj.bias)

        if self.copy_path:
            self.max_frames = int(max_frames)
            self.image_attention = FrameAttention(2 * hd, hd, dv, self.max_frames)
            if image_head == "warp":
                self.motion = MotionWarp(context_frames, 2 * hd)
                # [generated, warped, inside-the-frame mask]: new name, so copy checkpoints keep theirs.
                self.warp_gate_conv = nn.Sequential(
                    nn.Conv2d(7, 8, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(8, 1, 3, padding=1)
                )
            else:
                self.copy_gate_conv = nn.Sequential(
                    nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(8, 1, 3, padding=1)
                )
            self.copy_gate_bias = nn.Linear(2 * hd, 1)
            self.text_attention = FrameAttention(2 * hd, hd, dt, self.max_frames)
            self.text_copy_gate = nn.Linear(2 * hd, 1)
            self.register_load_state_dict_pre_hook(_rename_old_attention_keys)
        if text_head == "pointer":  # after every older module: their parameter order is kept
            self.pointer = PointerHead(text.embed_dim, text.hidden_dim, text.pad_id, text.bos_id)

    # ------------------------------------------------------------------------------------------
    def freeze_autoencoders(self, flag: bool = True) -> None:
        """Freeze (``True``) or unfreeze the visual and text autoencoders (encoders and decoders).

        Frozen autoencoders also stay in eval mode when ``.train()`` is called (no dropout)."""
        self.autoencoders_frozen = bool(flag)
        for p in list(self.visual.parameters()) + list(self.text.parameters()):
            p.requires_grad_(not flag)
        self.train(self.training)

    def train(self, mode: bool = True) -> StoryContinuationModel:
        super().train(mode)
        if self.autoencoders_frozen:
            self.visual.eval()
            self.text.eval()
        return self

    # ------------------------------------------------------------------------------------------
    def encode_frames(
        self, frames: torch.Tensor, tokens: torch.Tensor, lengths: HostLengths | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``frames[B,K,3,H,W], tokens[B,K,L]`` -> per-frame latents ``v[B,K,Dv], t[B,K,Dt]``."""
        b, k = frames.shape[:2]
        v = self.visual.encode(frames.flatten(0, 1)).view(b, k, -1)
        t = self.text.encode(tokens.flatten(0, 1), lengths).view(b, k, -1)
        return v, t

    def tag_features(self, tags: torch.Tensor) -> torch.Tensor:
        """``tags[B,K,T]`` (0 = padding) -> ``[B,K,Hd]``: projected mean of the tag embeddings."""
        emb = self.tag_embed(tags)  # padding rows are zero
        count = (tags != 0).sum(-1, keepdim=True).clamp(min=1).to(emb.dtype)
        return self.tag_proj(emb.sum(-2) / count)

    def _context(
        self,
        frames: torch.Tensor,
        tokens: torch.Tensor,
        tags: torch.Tensor | None = None,
        lengths: HostLengths | None = None,
    ) -> dict[str, torch.Tensor]:
        v, t = self.encode_frames(frames, tokens, lengths)
        fused = self.fusion(v, t)  # [B,K,Hd]
        if self.tag_vocab:
            if tags is None:
                raise ValueError("this model uses tag features (model.tag_features): pass the batch's 'tags'")
            fused = fused + self.tag_features(tags)
        out, h = run_fp32(self.gru, fused)  # out [B,K,Hd], h [1,B,Hd]; fp32 under autocast too
        scores = self.attn_score(torch.tanh(self.attn_proj(out))).squeeze(-1)  # [B,K]
        attn = torch.softmax(scores, dim=-1)
        pooled = torch.einsum("bk,bkh->bh", attn, out)
        ctx = torch.cat([pooled, h[-1]], dim=-1)
        return {"ctx": ctx, "gru_out": out, "attention": attn, "frame_visual_latents": v, "frame_text_latents": t}

    def _text_latent(self, c: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The predicted text latent; with the copy path, blended with an attended input sentence."""
        generated = self.to_text(c["ctx"])
        if not self.copy_path:
            return {"text_latent": generated}
        t = c["frame_text_latents"]
        weights = torch.softmax(self.text_attention.scores(c["ctx"], c["gru_out"], t), dim=-1)
        copied = torch.einsum("bk,bkd->bd", weights, t)
        gate = torch.sigmoid(self.text_copy_gate(c["ctx"]))
        return {
            "text_latent": gate * copied + (1.0 - gate) * generated,
            "text_copy_weights": weights,
            "text_copy_gate": gate.squeeze(-1),
        }

    def predict_latents(
        self, frames: torch.Tensor, tokens: torch.Tensor, tags: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """The predicted next-frame latents and the pooling attention (no decoding)."""
        c = self._context(frames, tokens, tags)
        return {
            "visual_latent": self.to_visual(c["ctx"]),
            "text_latent": self._text_latent(c)["text_latent"],
            "attention": c["attention"],
        }

    def text_condition(self, out: dict[str, torch.Tensor], tokens: torch.Tensor) -> TextCondition:
        """The condition :meth:`forward` gave the text decoder: ``out``'s predicted text latent and, for
        the pointer head, the input sentences ``tokens[B,K,L]`` with the copy path's weights over them."""
        if self.text_head == "generate":
            return TextCondition(out["text_latent"])
        return TextCondition(out["text_latent"], tokens, out.get("text_copy_weights"))

    def sentence_condition(self, sentence: torch.Tensor) -> TextCondition:
        """The decoder fed one input sentence ``[B,L]`` instead of the story (the repeat floors): its
        encoding, and for the pointer head its tokens as the only ones to copy."""
        latent = self.text.encode(sentence)
        return TextCondition(latent) if self.text_head == "generate" else TextCondition(latent, sentence[:, None])

    def text_outputs(self, condition: TextCondition, target_tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """Teacher forcing: ``text_logits[B,L-1,V]`` for ``target_tokens[:, 1:]`` and, with the pointer
        head, ``pointer_copy_probability[B,L-1]`` and ``pointer_attention[B,L-1,K,L]``."""
        if self.text_head == "pointer":
            return self.pointer.teacher_forced(self.text, condition, target_tokens[:, :-1])
        return {"text_logits": self.text.decode_logits(condition.latent, target_tokens[:, :-1])}

    def text_logits(self, condition: TextCondition | torch.Tensor, target_tokens: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits ``[B,L-1,V]`` for ``target_tokens[:, 1:]`` given a condition (e.g. a
        shuffled one, for the true-vs-shuffled control); a bare latent is enough for the generate head."""
        if isinstance(condition, torch.Tensor):
            condition = TextCondition(condition)
        return self.text_outputs(condition, target_tokens)["text_logits"]

    def forward(
        self,
        frames: torch.Tensor,
        tokens: torch.Tensor,
        target_tokens: torch.Tensor | None = None,
        target_frame: torch.Tensor | None = None,
        tags: torch.Tensor | None = None,
        input_lengths: HostLengths | None = None,
        target_lengths: HostLengths | None = None,
        source_tokens: torch.Tensor | None = None,
        text_target_tokens: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """``source_tokens[B,K,L]``/``text_target_tokens[B,L]``: what the pointer head copies from and
        is taught to say, when not ``tokens``/``target_tokens`` (training with
        ``model.pointer_word_swap``: the renamed sentences; the frame encoders and the target latent
        read the true ones).

        Returns ``image[B,3,H,W]``, ``context[B,3,h,w]``, ``visual_latent[B,Dv]``,
        ``text_latent[B,Dt]``, ``attention[B,K]``; ``text_logits[B,L-1,V]`` when ``target_tokens`` is
        given; ``target_visual_latent``/``target_text_latent`` (the autoencoders' encodings of the true
        next frame, without gradient) when ``target_frame``/``target_tokens`` are given; and with the
        copy path ``copy_gate[B,1,H,W]``, ``copy_weights[B,K]``, ``generated_image[B,3,H,W]``,
        ``copied_image[B,3,H,W]`` (warped with the warp head), ``text_copy_weights[B,K]`` and
        ``text_copy_gate[B]``; with ``image_head="warp"`` also ``warp_params[B,K,3]``; with
        ``text_head="pointer"`` and ``target_tokens`` also ``pointer_copy_probability[B,L-1]`` (per
        step, the probability of copying an input token), ``pointer_attention[B,L-1,K,L]`` (over the
        input sentences' tokens) and, with ``pointer_generate_loss``, ``generate_text_logits[B,L-1,V]``
        (the generate head's, from the same latent with all its gradient: the story model's text loss).
        ``input_lengths``/``target_lengths``: the sentences' token counts on the host (the loader's), so
        that encoding them never waits for the GPU."""
        c = self._context(frames, tokens, tags, input_lengths)
        ctx = c["ctx"]
        zv = self.to_visual(ctx)
        text = self._text_latent(c)
        zt = text.pop("text_latent")
        if getattr(self.visual, "decoder_skips", False):
            dec = self.visual.decode(zv, self.visual.encode_with_features(frames[:, -1])[1])
        else:
            dec = self.visual.decode(zv)
        out: dict[str, torch.Tensor] = {
            "image": dec["content"],
            "context": dec["context"],
            "visual_latent": zv,
            "text_latent": zt,
            **self.shared_latents(zv, zt),
            "attention": c["attention"],
        }
        if self.copy_path:
            out.update(self._copy(frames, c, dec["content"]))
            out.update(text)
        if target_tokens is not None:
            source = tokens if source_tokens is None else source_tokens
            taught = target_tokens if text_target_tokens is None else text_target_tokens
            out.update(
                self.text_outputs(self._teaching_condition(c, zt, source, text.get("text_copy_weights")), taught)
            )
            if self.pointer_generate_loss:
                out["generate_text_logits"] = self.text.decode_logits(zt, target_tokens[:, :-1])
            with torch.no_grad():
                out["target_text_latent"] = self.text.encode(target_tokens, target_lengths)
        if target_frame is not None:
            with torch.no_grad():
                out["target_visual_latent"] = self.visual.encode(target_frame)
        return out

    def _teaching_condition(
        self, c: dict[str, torch.Tensor], latent: torch.Tensor, source: torch.Tensor, weights: torch.Tensor | None
    ) -> TextCondition:
        """What the text head is taught from. The pointer head's cross-entropy reaches the story model
        (GRU, fusion, visual encoder: what the image depends on) scaled by ``pointer_story_gradient``:
        the latent, and the sentence weights recomputed over the story state, carry that share of the
        gradient back, while the sentence attention itself (which shot to repeat) and the text
        autoencoder (decoder, embeddings) get all of it. Same values for every share; only how much
        the text steers the shared state differs (docs/variants.md: all of it costs the pan image, none
        of it the shapes image).

        The default is none of it, and instead (``pointer_generate_loss``, in :meth:`forward`) the
        generate head's cross-entropy on a second decoding of the same latent: the story model then
        learns text as it does under the generate head, which keeps both images at generate's, while
        the pointer learns to copy on top of it."""
        if self.text_head == "generate":
            return TextCondition(latent)
        share = self.pointer_story_gradient
        if share == 1.0:
            return TextCondition(latent, source, weights)
        if weights is not None:
            scores = self.text_attention.scores(
                _gradient_share(c["ctx"], share),
                _gradient_share(c["gru_out"], share),
                _gradient_share(c["frame_text_latents"], share),
            )
            weights = torch.softmax(scores, dim=-1)
        return TextCondition(_gradient_share(latent, share), source, weights)

    def shared_latents(self, visual_latent: torch.Tensor, text_latent: torch.Tensor) -> dict[str, torch.Tensor]:
        """With latents of different sizes and a fusion that projects both into one space (``gate``):
        ``shared_visual_latent``/``shared_text_latent`` there, where cross-modal InfoNCE trains them
        and evaluation compares them. Empty when the sizes agree (the latents are compared as they are)."""
        if visual_latent.shape[-1] == text_latent.shape[-1] or not getattr(self.fusion, "shares_space", False):
            return {}
        return {
            "shared_visual_latent": self.fusion.proj_v(visual_latent),
            "shared_text_latent": self.fusion.proj_t(text_latent),
        }

    def _copy(
        self, frames: torch.Tensor, c: dict[str, torch.Tensor], generated: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        scores = self.image_attention.scores(c["ctx"], c["gru_out"], c["frame_visual_latents"])
        extra: dict[str, torch.Tensor] = {}
        candidates = frames
        if self.image_head == "warp":
            motion = self.motion(frames, c["ctx"])
            scores = scores + motion["frame_logits"]
            candidates = motion["warped"]
            extra = {"warp_params": motion["params"]}
        weights = torch.softmax(scores, dim=-1)
        if self.image_head == "warp":
            inside = torch.einsum("bk,bkchw->bchw", weights, motion["inside"])
        copied = torch.einsum("bk,bkchw->bchw", weights, candidates)
        if copied.shape[-2:] != generated.shape[-2:]:
            copied = F.interpolate(copied, size=generated.shape[-2:], mode="bilinear", align_corners=False)
        if self.image_head == "warp":
            if inside.shape[-2:] != generated.shape[-2:]:
                inside = F.interpolate(inside, size=generated.shape[-2:], mode="bilinear", align_corners=False)
            gate_logit = self.warp_gate_conv(torch.cat([generated, copied, inside], dim=1))
        else:
            gate_logit = self.copy_gate_conv(torch.cat([generated, copied], dim=1))
        gate = torch.sigmoid(gate_logit + self.copy_gate_bias(c["ctx"])[:, :, None, None])
        image = gate * copied + (1.0 - gate) * generated
        return {
            "image": image,
            "generated_image": generated,
            "copied_image": copied,
            "copy_gate": gate,
            "copy_weights": weights,
            **extra,
        }

    @torch.no_grad()
    def generate_text(
        self,
        frames: torch.Tensor,
        tokens: torch.Tensor,
        max_len: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
        tags: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Next sentence ``tokens[B,max_len]`` (bos first, pad after eos); :meth:`continue_text` also
        says what the pointer copied."""
        return self.continue_text(frames, tokens, max_len, temperature, top_p, generator, tags).tokens

    @torch.no_grad()
    def continue_text(
        self,
        frames: torch.Tensor,
        tokens: torch.Tensor,
        max_len: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
        tags: torch.Tensor | None = None,
    ) -> GeneratedText:
        """The next sentence of each window and, with the pointer head, each step's copy probability and
        attention over the input sentences' tokens (:class:`GeneratedText`)."""
        c = self._context(frames, tokens, tags)
        condition = self.text_condition(self._text_latent(c), tokens)
        return self.decode_text(condition, max_len, temperature=temperature, top_p=top_p, generator=generator)

    @torch.no_grad()
    def decode_text(
        self,
        condition: TextCondition,
        max_len: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> GeneratedText:
        """Decode a sentence per row of ``condition`` (greedy at temperature 0, else nucleus sampling)."""
        options = {"temperature": temperature, "top_p": top_p, "generator": generator}
        if self.text_head == "generate":
            return GeneratedText(self.text.generate(condition.latent, max_len, **options))
        decoding = self.pointer.decoding(self.text, condition)
        tokens = self.text.generate(condition.latent, max_len, step_logits=decoding, **options)
        return decoding.result(tokens)
