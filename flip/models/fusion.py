"""Multimodal fusion for VQA: a new single-stream Transformer over both towers' tokens, and
the answer classifier.

The FLIP paper (Table 7) fine-tunes for VQAv2 "with a newly initialized multimodal fusion
transformer and an answer classifier", following METER (Dou et al., CVPR 2022); its appendix
with the exact design is not part of the text this project has. Here, in the simplest form
of that family (a single stream, as ViLT's, on top of the two encoders):

* the image tokens (class token and patches, after the image tower's final norm) and the
  question tokens (after the text tower's final norm) are projected to the fusion width,
  and each gets a learned modality (type) embedding, as ViLT's ``token_type_embeddings``;
  positions are already in the tokens (each tower added its own position embedding);
* the sequence ``[image tokens | question tokens]`` runs through ``depth`` pre-norm
  Transformer blocks (the towers' timm blocks) and a final LayerNorm; the pooled feature is
  the concatenation of the mean image token and the mean (non-padding) question token, as
  METER concatenates one pooled token of each stream, so the question's ~8 tokens are not
  outweighed by ~65 image tokens in the pooled feature;
* padding positions of the question are excluded as attention keys (the FLIP text tower
  itself, like the official one, attends to padding; the fusion need not);
* the classifier is METER's VQA head on the 2w-wide pooled feature: Linear(2w, 2w),
  LayerNorm, GELU, Linear(2w, #answers), one logit per answer of the vocabulary (sigmoid:
  several answers can be right, trained with soft scores).

METER fuses with co-attention (two streams with cross-attention, 6 layers of width 768) and
pools the first token of each stream through a Linear + tanh pooler; a single stream is
simpler and fits the tiny miniature.
"""

import math

import torch
from torch import nn

from flip.models.transformer import transformer_blocks

IMAGE_TYPE, TEXT_TYPE = 0, 1


class FusionTransformer(nn.Module):
    def __init__(
        self,
        image_width: int,  # width of the image tower's tokens
        text_width: int,  # width of the text tower's tokens
        width: int = 768,
        depth: int = 6,
        heads: int = 12,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
    ):
        super().__init__()
        self.width = width
        self.image_proj = nn.Linear(image_width, width)
        self.text_proj = nn.Linear(text_width, width)
        self.type_embed = nn.Embedding(2, width)
        self.blocks = transformer_blocks(width, depth, heads, mlp_ratio, drop_path)
        self.norm = nn.LayerNorm(width)
        for proj in (self.image_proj, self.text_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)
        nn.init.normal_(self.type_embed.weight, std=0.02)

    @property
    def out_features(self) -> int:
        return 2 * self.width

    def forward(
        self,
        image_tokens: torch.Tensor,
        text_tokens: torch.Tensor,
        text_padding: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """image_tokens (B, Ti, Di), text_tokens (B, Tt, Dt), text_padding (B, Tt) bool
        (True: padding, neither attended to nor pooled) -> pooled feature (B, 2 width):
        [mean image token | mean question token]."""
        b, ti = image_tokens.shape[:2]
        image = self.image_proj(image_tokens) + self.type_embed.weight[IMAGE_TYPE]
        text = self.text_proj(text_tokens) + self.type_embed.weight[TEXT_TYPE]
        x = torch.cat([image, text], dim=1)
        if text_padding is None:
            text_padding = torch.zeros(text.shape[:2], dtype=torch.bool, device=x.device)
        ignored = torch.cat(
            [torch.zeros(b, ti, dtype=torch.bool, device=x.device), text_padding], dim=1
        )
        # additive key mask, broadcast over heads and queries; image tokens are never
        # masked, so no attention row is empty
        bias = torch.zeros(ignored.shape, dtype=x.dtype, device=x.device).masked_fill(
            ignored, float("-inf")
        )[:, None, None, :]
        for block in self.blocks:
            x = block(x, attn_mask=bias)
        x = self.norm(x)
        words = (~text_padding).unsqueeze(-1).to(x.dtype)  # (B, Tt, 1)
        question = (x[:, ti:] * words).sum(1) / words.sum(1).clamp(min=1)
        return torch.cat([x[:, :ti].mean(1), question], dim=1)


class AnswerClassifier(nn.Sequential):
    """METER's VQA head: Linear(d, d), LayerNorm, GELU, Linear(d, num_answers).

    Weights as ViLT's ``init_weights`` (normal(0.02)); the output bias starts at the log-odds
    of 1 / num_answers (the prior-probability initialisation of Lin et al., "Focal loss",
    2017): with one right answer among many, zero logits (p = 0.5 for every answer) would
    spend the first steps of the sum-over-answers BCE pushing every logit down before any
    answer is told apart.
    """

    def __init__(self, in_features: int, num_answers: int):
        super().__init__(
            nn.Linear(in_features, in_features),
            nn.LayerNorm(in_features),
            nn.GELU(),
            nn.Linear(in_features, num_answers),
        )
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.constant_(self[-1].bias, -math.log(max(num_answers - 1, 1)))
