"""What is wrong with the photos, from their cached features: near-duplicates, label issues, outliers."""
