"""Training: one loop (``loop.train``), three stages, backends behind ``runtime.Runtime``."""
