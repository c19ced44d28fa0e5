"""Many cycles at once: the batch flow's engine (dispatch, stop, summary), its job file,
the priority queue with backpressure, and the Dask cluster it may run on.
"""
