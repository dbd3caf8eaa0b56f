"""vmat pipeline."""
