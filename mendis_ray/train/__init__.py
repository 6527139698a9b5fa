"""Training without Ray (``loop``); the Ray trainer reuses these functions."""
