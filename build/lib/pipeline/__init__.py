"""Transfer learning on images with a feature cache: features -> train_head -> evaluate."""
import os

# TensorFlow's C++ start-up chatter hides the one-line messages this tool prints.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"
