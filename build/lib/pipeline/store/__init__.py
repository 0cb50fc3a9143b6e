"""The HDF5 feature cache: its format (table), work in progress (parts), reading it in batches (batches)."""
