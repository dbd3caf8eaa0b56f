"""abr pipeline."""
