"""What a user reads: the HTML results and load-test reports and the side-by-side
comparison of two runs.
"""
