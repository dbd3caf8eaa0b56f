"""lensing pipeline."""
