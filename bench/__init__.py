"""consolegate benchmarks (not tests): ``python -m bench`` runs them all and prints a table.

Every figure compared is measured in the same run, against the same real Xvnc, with the same
client code; see bench/run.py for the sections and their time budgets.
"""
