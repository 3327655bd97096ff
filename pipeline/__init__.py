"""Prefect flows that run, schedule and compare the DVC pipeline (see `python -m pipeline --help`)."""
