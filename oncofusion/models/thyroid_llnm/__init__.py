"""Thyroid lateral lymph-node metastasis from ultrasound, report, morphology, demographics: LLNM-Net."""
