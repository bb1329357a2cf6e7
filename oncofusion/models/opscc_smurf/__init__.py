"""SMuRF: CT tumor and lymph-node sub-volumes fused with whole-slide embeddings for OPSCC survival and grade."""
