"""Model selection: the cost model (cost.py), the budgeted search (search.py), scaling-law fits (scaling.py) and the
report with its plots (report.py); `python -m train.select` is the job."""
