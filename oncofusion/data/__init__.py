"""Data readers and manifests: LIDC-IDRI annotations (:mod:`.lidc`), case manifests (:mod:`.manifest`)."""
