"""The downstream evaluation sets, read from disk (nothing is downloaded): ``datasets``
(built from ``conf/eval_data`` entries, CLIP_benchmark's builders), ``readers`` (our own
readers of the layouts it has none for) and ``metadata`` (class names, prompt templates,
label spaces; files in ``metadata/``)."""
