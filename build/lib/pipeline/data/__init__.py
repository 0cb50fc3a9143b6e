"""Photos on disk: finding and splitting them (scan), decoding them (decode), resizing them (resize)."""
