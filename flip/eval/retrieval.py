"""Zero-shot image-text retrieval (Flickr30k, COCO: Table 5) as a LightningModule.

Every image and every caption is embedded once (normalised), gathered from all processes,
then ranked by cosine similarity: ``image_to_text_R@k`` (text retrieval: an image is a hit
when any of its captions is among the k nearest texts) and ``text_to_image_R@k`` (image
retrieval: a caption is a hit when its image is among the k nearest images).
``mask``, ``masked_views``, ``mask_seed``: masked inference on the images
(``flip.eval.masked_views``); 0 = every patch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flip.eval.masked_views import encode_image_views
from flip.eval.module import EvalModule
from flip.metrics.zeroshot import Collect, dedupe_by_index, retrieval_recall

MAX_CAPTIONS = 1000  # caption slots per image in the text ordering key (index * MAX + j)


class ZeroShotRetrieval(EvalModule):
    def __init__(
        self,
        model,
        dataset,
        tokenizer,
        ks: Sequence[int] = (1, 5, 10),
        batch_size: int = 256,
        num_workers: int = 0,
        mask: float = 0.0,
        masked_views: str = "single",
        mask_seed: int = 0,
    ):
        super().__init__(model, dataset, batch_size, num_workers)
        self.tokenizer, self.ks = tokenizer, list(ks)
        self.mask, self.masked_views, self.mask_seed = mask, masked_views, mask_seed
        self.images = Collect("index", "emb")
        self.texts = Collect("key", "emb")

    def collate(self, batch):
        index, images, captions = zip(*batch)
        keys, flat = [], []
        for i, caps in zip(index, captions):
            if len(caps) > MAX_CAPTIONS:
                raise ValueError(f"image {i} has {len(caps)} captions (at most {MAX_CAPTIONS})")
            for j, c in enumerate(caps):
                keys.append(i * MAX_CAPTIONS + j)
                flat.append(c)
        return (torch.tensor(index), torch.stack(images), torch.tensor(keys), self.tokenizer(flat))

    def test_step(self, batch, batch_idx):
        index, images, keys, tokens = batch
        image = encode_image_views(
            self.model, images, index, self.mask, self.masked_views, self.mask_seed
        )
        self.images.update(index=index, emb=image.float())
        self.texts.update(key=keys, emb=self.model.encode_text(tokens).float())

    def on_test_epoch_end(self) -> None:
        img, txt = self.images.compute(), self.texts.compute()
        index, image_emb = dedupe_by_index(img["index"], img["emb"])
        keys, text_emb = dedupe_by_index(txt["key"], txt["emb"])
        owner = torch.searchsorted(index, keys // MAX_CAPTIONS)  # row of each text's image
        out = retrieval_recall(image_emb, text_emb, owner, self.ks)
        out["num_images"], out["num_texts"] = float(len(index)), float(len(keys))
        self.publish(out)
