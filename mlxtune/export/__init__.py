"""Exports of a trained run: the adapter folded into the base weights (``merge.py``)."""
