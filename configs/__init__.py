"""Experiment configurations (ml_collections). Each file has `get_config(arg=None)`."""
