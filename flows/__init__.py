"""Prefect flows (thin composition) and the `dspyflow` command."""
