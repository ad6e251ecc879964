"""The data report behind ``hf-loop inspect``, and the run plot behind ``hl.plot_run``.

A report answers, before any training: how long are the examples, how much of each batch would be padding under
each sampling strategy (computed by running hf_loop's own samplers over the real lengths), how imbalanced are the
labels and which class weights ``sampler="weighted"`` would use, and for a stream which reader (rank x worker)
reads which shard.

Example:
    >>> from hf_loop.report import inspect
    >>> report = inspect("./my_data", tokenizer="./my_tokenizer", batch_size=32, out="reports")  # doctest: +SKIP
    >>> print(report)                                                                             # doctest: +SKIP
"""

from hf_loop.report.inspection import inspect, measure
from hf_loop.report.labels import LabelSet, describe_missing, is_regression, label_set, missing_rows
from hf_loop.report.numbers import (
    STRATEGIES,
    DataReport,
    batch_waste,
    default_max_tokens,
    label_balance,
    length_summary,
    padding_waste,
)
from hf_loop.report.plots import METRICS_FILE, plot_lengths, plot_run, read_metrics

__all__ = [
    "METRICS_FILE",
    "STRATEGIES",
    "DataReport",
    "LabelSet",
    "batch_waste",
    "default_max_tokens",
    "describe_missing",
    "inspect",
    "is_regression",
    "label_balance",
    "label_set",
    "length_summary",
    "measure",
    "missing_rows",
    "padding_waste",
    "plot_lengths",
    "plot_run",
    "read_metrics",
]
