"""Reproduction kit for the paper's Table 2: data, reward, launch checks, evaluation and report.

Modules here stay light at import time: the reward's math-verify worker imports this package in a
fresh interpreter, and verl imports the reward module in every reward worker.
"""
