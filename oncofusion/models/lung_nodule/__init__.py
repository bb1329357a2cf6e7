"""Lung nodule malignancy from nine 2D views of a 3D crop, aligned to radiologist semantic text
(Zhuang et al., J Biomed Inform 2025): LIDC-IDRI reader, report text, nine views, network, predictor."""
