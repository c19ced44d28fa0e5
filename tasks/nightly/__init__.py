"""The nightly benchmark suite and the regression test that compares each metric with
its history.
"""
