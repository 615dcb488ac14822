"""Reports: tidy results tables in, fits, seaborn figures and report.md out.

Nothing here imports a model: every report is a pure function of DataFrames read from run
directories (`results.collect`).
"""
