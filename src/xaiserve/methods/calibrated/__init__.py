"""S-CAM: CAMs on the common intensity scale of a model's calibration (seed 003)."""
