"""MONAI Label glue: bundle -> infer/train tasks, request validation, result writers."""
