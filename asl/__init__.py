"""asl pipeline."""
