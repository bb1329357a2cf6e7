"""Hand-crafted image features (radiomics) that name no model."""
