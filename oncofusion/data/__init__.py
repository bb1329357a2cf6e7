"""Data: case manifests (:mod:`.manifest`), folds (:mod:`.folds`), clinical fields (:mod:`.clinical`), sampling and ROIs."""
