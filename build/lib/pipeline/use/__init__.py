"""Using a trained model: predict on new photos, export it, report on it, compare the rungs."""
