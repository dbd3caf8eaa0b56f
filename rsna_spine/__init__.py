"""rsna_spine pipeline."""
