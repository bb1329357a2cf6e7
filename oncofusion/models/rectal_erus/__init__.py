"""Rectal ERUS nCRT response: frozen CLIP features, a LightGBM fold ensemble, SHAP by modality."""
