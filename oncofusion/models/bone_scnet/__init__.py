"""Bone tumor matrix (osteoid vs chondroid) from CT fused with clinical fields: SC-Net and its
image-only ablation S-Net (Liu et al., Nan Fang Yi Ke Da Xue Xue Bao 2024)."""
