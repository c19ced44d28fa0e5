"""Open-model load testing: patterns, the scheduler, HDR histograms, targets, resource
monitoring, bottlenecks, thresholds, reports and persistence.

Plain modules (no Prefect): ``patterns``, ``scheduler``, ``histograms``, ``results``,
``targets``, ``monitor``, ``bottlenecks``, ``thresholds``, ``config``, ``runner``
(``run_load_test``, ``judge``), ``report``, ``store`` (``remerge``) and ``loopback`` (a
real HTTP server for calibration). ``steps`` holds the Prefect tasks the flows compose.
"""
