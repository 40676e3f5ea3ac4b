"""Training: the one loop, the UI protocol it reports to, and the `run` session."""
