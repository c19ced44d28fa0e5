"""One optimization cycle, start to terminal state: the spec, the steps (baseline,
optimizer, final evaluation, record), its budget guard, timer and monitor, the outcome
write that survives a database outage, and recovery of runs whose worker died.
"""
