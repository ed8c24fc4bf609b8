"""Sampling: the pipeline with the adapter, and the sample folder's bookkeeping."""
