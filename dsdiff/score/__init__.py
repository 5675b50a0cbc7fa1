"""Label-quality scoring: the labelling settings judged on real annotated tune-split images (``dsdiff.score_labels``)."""
