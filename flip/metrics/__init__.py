"""How predictions are scored against references, independent of models and data loading:
``zeroshot`` (retrieval Recall@k, PM-k, 11-point mAP, gathering over processes), ``vqa``
(the official VQA accuracy and answer normalisation), ``captions`` (the COCO caption
metrics)."""
