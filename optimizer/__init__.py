"""slimserve optimizer: turn a model and sample data into a faster model inside an accuracy budget.

A library with no web or database code. The public entry point is
:func:`optimizer.pipeline.optimize`; the command line is :mod:`optimizer.cli`.
"""

__version__ = "0.1.0"
