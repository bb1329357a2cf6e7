"""Model-family inference: from an image and an ROI to the prediction a client shows."""
