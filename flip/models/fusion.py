"""Multimodal fusion for VQA: a new single-stream Transformer over both towers' tokens, and
the answer classifier.

The FLIP paper (Table 7) fine-tunes for VQAv2 "with a newly initialized multimodal fusion
transformer and an answer classifier", following METER (Dou et al., CVPR 2022); its appendix
with the exact design is not part of the text this project has. Here, in the simplest form
of that family (ViLT's single stream on top of separate encoders):

* the image tokens (class token and patches, after the image tower's final norm) and the
  question tokens (after the text tower's final norm) are projected to the fusion width,
  and each gets a learned modality (type) embedding, as ViLT's ``token_type_embeddings``;
  positions are already in the tokens (each tower added its own position embedding);
* a learned fusion class token is prepended, the sequence
  ``[fusion cls | image tokens | question tokens]`` runs through ``depth`` pre-norm
  Transformer blocks (the towers' timm blocks), and the class token's output after a final
  LayerNorm is the pooled feature;
* padding positions of the question are excluded as attention keys (the FLIP text tower
  itself, like the official one, attends to padding; the fusion need not);
* the classifier is ViLT's/METER's VQA head: Linear(w, 2w), LayerNorm, GELU,
  Linear(2w, #answers), one logit per answer of the vocabulary (sigmoid: several answers
  can be right, trained with soft scores).

METER instead fuses with co-attention (two streams with cross-attention, 6 layers of width
768) and pools the first token of each stream; a single stream is what the brief of this
project asks and what fits the tiny miniature.
"""
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
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.blocks = transformer_blocks(width, depth, heads, mlp_ratio, drop_path)
        self.norm = nn.LayerNorm(width)
        for proj in (self.image_proj, self.text_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)
        nn.init.normal_(self.type_embed.weight, std=0.02)
        nn.init.normal_(self.cls_token, std=0.02)

    def forward(self, image_tokens: torch.Tensor, text_tokens: torch.Tensor,
                text_padding: torch.Tensor | None = None) -> torch.Tensor:
        """image_tokens (B, Ti, Di), text_tokens (B, Tt, Dt), text_padding (B, Tt) bool
        (True: padding, not attended to) -> pooled feature (B, width)."""
        b = image_tokens.shape[0]
        image = self.image_proj(image_tokens) + self.type_embed.weight[IMAGE_TYPE]
        text = self.text_proj(text_tokens) + self.type_embed.weight[TEXT_TYPE]
        x = torch.cat([self.cls_token.expand(b, -1, -1), image, text], dim=1)
        bias = None
        if text_padding is not None:
            ignored = torch.cat([torch.zeros(b, 1 + image.shape[1], dtype=torch.bool,
                                             device=x.device), text_padding], dim=1)
            # additive key mask, broadcast over heads and queries; the class and image
            # tokens are never masked, so no attention row is empty
            bias = torch.zeros(ignored.shape, dtype=x.dtype, device=x.device).masked_fill(
                ignored, float("-inf"))[:, None, None, :]
        for block in self.blocks:
            x = block(x, attn_mask=bias)
        return self.norm(x[:, 0])


class AnswerClassifier(nn.Sequential):
    """ViLT/METER's VQA head: Linear(w, 2w), LayerNorm, GELU, Linear(2w, num_answers)."""

    def __init__(self, width: int, num_answers: int):
        super().__init__(nn.Linear(width, 2 * width), nn.LayerNorm(2 * width), nn.GELU(),
                         nn.Linear(2 * width, num_answers))
        for m in self.modules():
            if isinstance(m, nn.Linear):  # ViLT's objectives.init_weights: normal(0.02), 0
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
