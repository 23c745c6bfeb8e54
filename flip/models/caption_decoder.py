"""Caption decoder: a newly initialised Transformer decoder over the image encoder's tokens.

The paper's captioner (Table 7) "follows the cross-entropy training baseline" of Barraco
et al. (CVPR-W 2022): a standard Transformer decoder that cross-attends to the grid of
visual tokens (here every output token of the FLIP image encoder, class token included,
not the pooled vector). Its exact size is in the paper's appendix, which we do not have:
width, depth and heads are settings (conf/task/captioning.yaml).

- Layers: ``torch.nn.TransformerDecoderLayer``, pre-norm (``norm_first``), causal
  self-attention, cross-attention to the projected image tokens, GELU MLP; a final
  LayerNorm. Learned position embedding over ``max_length`` positions.
- Vocabulary: the contrastive tokenizer's BERT-uncased WordPiece vocabulary
  (``flip.tokenizer``), whose captions carry no special tokens. The decoder needs a start
  and an end: BERT's own ``[CLS]`` starts every sequence and ``[SEP]`` ends it, ``[PAD]``
  fills the rest (ignored by the loss). They exist in the vocabulary already, so captions
  tokenise and decode with the same tokenizer. The decoder's ``vocab_size`` ids index the
  data's choice of word pieces (``flip.data.captions``: those of the training captions, or
  all 30522, where the defaults 101/102/0 are the WordPiece ids themselves).
- Output projection tied to the token embedding by default (``tie_embeddings``).

Decoding (``generate``): greedy, or beam search over ``beam_size`` hypotheses with an
optional length penalty; ``[CLS]`` and ``[PAD]`` are never generated. Beam search keeps a
finished hypothesis in its slot (extended by ``[PAD]`` at no cost) and ranks the final
beams by ``log p / length ** length_penalty`` (0: the sum of log-probabilities). Scores
are summed in float64 so that ranking the beams never merges two float32
log-probabilities: with ``beam_size=1`` beam search returns exactly the greedy captions.
No key/value cache: every step re-runs the prefix (captions are short).
"""

from __future__ import annotations

import torch
from torch import nn

from flip.tokenizer import BOS_ID, EOS_ID, PAD_ID


class CaptionDecoder(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        memory_width: int,  # width of the image encoder's tokens
        width: int = 512,
        depth: int = 3,
        heads: int = 8,
        mlp_ratio: float = 4.0,
        max_length: int = 32,  # positions: [CLS] + up to max_length - 1 word pieces
        dropout: float = 0.1,
        bos_id: int = BOS_ID,  # BERT [CLS]
        eos_id: int = EOS_ID,  # BERT [SEP]
        pad_id: int = PAD_ID,  # BERT [PAD]
        tie_embeddings: bool = True,  # output projection = token embedding (transposed)
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        specials = (bos_id, eos_id, pad_id)
        if len(set(specials)) != 3 or not all(0 <= i < vocab_size for i in specials):
            raise ValueError(
                f"bos_id={bos_id}, eos_id={eos_id}, pad_id={pad_id} must be distinct "
                f"ids of the vocabulary (size {vocab_size})"
            )
        self.vocab_size, self.max_length = vocab_size, max_length
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.memory_proj = nn.Linear(memory_width, width)
        self.token_embed = nn.Embedding(vocab_size, width)
        self.pos_embed = nn.Parameter(torch.zeros(1, max_length, width))
        layer = nn.TransformerDecoderLayer(
            width,
            heads,
            int(width * mlp_ratio),
            dropout,
            activation="gelu",
            layer_norm_eps=norm_eps,
            batch_first=True,
            norm_first=True,
        )
        self.layers = nn.TransformerDecoder(layer, depth, norm=nn.LayerNorm(width, eps=norm_eps))
        self.head = nn.Linear(width, vocab_size, bias=False)
        self._init_weights()
        if tie_embeddings:
            self.head.weight = self.token_embed.weight

    def _init_weights(self) -> None:
        # BERT/timm: normal(0.02) embeddings and linear layers, zero biases
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def project_memory(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, memory_width) image tokens -> (B, N, width) keys/values of cross-attention."""
        return self.memory_proj(image_tokens)

    def hidden(self, memory: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Projected memory (B, N, D) and input ids (B, T), [CLS] first -> states (B, T, D).
        No padding mask: with causal attention a word never sees the padding after it."""
        T = tokens.shape[1]
        if T > self.max_length:
            raise ValueError(f"{T} input tokens exceed the decoder's max_length={self.max_length}")
        x = self.token_embed(tokens) + self.pos_embed[:, :T]
        causal = nn.Transformer.generate_square_subsequent_mask(
            T, device=tokens.device, dtype=x.dtype
        )
        return self.layers(x, memory, tgt_mask=causal, tgt_is_causal=True)

    def forward(self, image_tokens: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: image tokens (B, N, memory_width), input ids (B, T) -> logits (B, T, V)."""
        return self.head(self.hidden(self.project_memory(image_tokens), tokens))

    def _next_log_probs(self, memory: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """log p(next token | prefix), (B, V) float32; [CLS] and [PAD] are never generated."""
        logp = self.head(self.hidden(memory, tokens)[:, -1]).float().log_softmax(-1)
        logp[:, [self.bos_id, self.pad_id]] = float("-inf")
        return logp

    def _strip(self, tokens: torch.Tensor) -> list[list[int]]:
        """Generated ids after [CLS], up to (without) the first [SEP]."""
        out = []
        for row in tokens[:, 1:].tolist():
            row = [t for t in row if t != self.pad_id]
            out.append(row[: row.index(self.eos_id)] if self.eos_id in row else row)
        return out

    @torch.no_grad()
    def generate(
        self,
        image_tokens: torch.Tensor,
        beam_size: int = 1,
        max_length: int | None = None,
        length_penalty: float = 0.0,
    ) -> list[list[int]]:
        """Captions of a batch of images as word-piece ids (no [CLS]/[SEP]/[PAD]).

        max_length: generated tokens, [SEP] included (default and at most the decoder's
        ``max_length``); beam_size 1 = greedy; length_penalty: final beams ranked by
        ``log p / length ** length_penalty``.
        """
        steps = self.max_length if max_length is None else max_length
        if not 1 <= steps <= self.max_length:
            raise ValueError(f"max_length must be in [1, {self.max_length}], got {max_length}")
        if beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {beam_size}")
        memory = self.project_memory(image_tokens)
        if beam_size == 1:
            return self._greedy(memory, steps)
        return self._beam(memory, steps, beam_size, length_penalty)

    def _greedy(self, memory: torch.Tensor, steps: int) -> list[list[int]]:
        B = memory.shape[0]
        tokens = torch.full((B, 1), self.bos_id, dtype=torch.long, device=memory.device)
        done = torch.zeros(B, dtype=torch.bool, device=memory.device)
        for _ in range(steps):
            nxt = self._next_log_probs(memory, tokens).argmax(-1)
            nxt = nxt.masked_fill(done, self.pad_id)
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            done |= nxt == self.eos_id
            if done.all():
                break
        return self._strip(tokens)

    def _beam(
        self, memory: torch.Tensor, steps: int, K: int, length_penalty: float
    ) -> list[list[int]]:
        B, device = memory.shape[0], memory.device
        memory = memory.repeat_interleave(K, dim=0)  # (B K, N, D), beams of an image adjacent
        tokens = torch.full((B * K, 1), self.bos_id, dtype=torch.long, device=device)
        scores = torch.full((B, K), float("-inf"), dtype=torch.float64, device=device)
        scores[:, 0] = 0.0  # one live beam at the start: no duplicate hypotheses
        done = torch.zeros(B * K, dtype=torch.bool, device=device)
        lengths = torch.zeros(B * K, dtype=torch.long, device=device)
        for _ in range(steps):
            logp = self._next_log_probs(memory, tokens).double()  # (B K, V)
            logp[done] = float("-inf")
            logp[done, self.pad_id] = 0.0  # a finished hypothesis carries on unchanged
            V = logp.shape[1]
            total = (scores.view(B * K, 1) + logp).view(B, K * V)
            scores, flat = total.topk(K, dim=1)  # (B, K)
            beam = (flat // V + torch.arange(B, device=device)[:, None] * K).view(-1)
            nxt = (flat % V).view(-1)
            tokens = torch.cat([tokens[beam], nxt[:, None]], dim=1)
            lengths = lengths[beam] + (~done[beam]).long()
            done = done[beam] | (nxt == self.eos_id)
            if done.all():
                break
        ranked = scores / lengths.view(B, K).clamp(min=1).double() ** length_penalty
        best = ranked.argmax(dim=1) + torch.arange(B, device=device) * K
        return self._strip(tokens[best])
