"""One sub-package per model family: what is that family's own (network, transforms, text, predictor
hooks). Generic layers never import from here."""
