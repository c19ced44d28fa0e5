"""Prefect tasks and the plain, testable logic they wrap."""
