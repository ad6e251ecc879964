"""The data report behind ``hf-loop inspect``, and the run plot behind ``hl.plot_run``.

A report answers, before any training: how long are the examples, how much of each batch would be padding under
each sampling strategy (computed by running hf_loop's own samplers over the real lengths), how imbalanced are the
labels and which class weights ``sampler="weighted"`` would use, and for a stream which reader (rank x worker)
reads which shard.

Example:
    >>> from hf_loop.report import inspect
    >>> report = inspect("./my_data", tokenizer="./my_tokenizer", batch_size=32, out="reports")
    >>> print(report)
    dataset: ./my_data [train]
    lengths of 'text' (tokens), 60 examples, 872 in all:
      min 2  p50 14.5  mean 14.53  p90 27.1  p99 29  max 29
    padding at batch size 32 (one epoch, hf_loop's samplers):
      random                               waste  49.9%  ...
      length-grouped                       waste  32.5%  ...
      token-budget (max_tokens=466)        waste  24.6%  ...
    labels (label): 2 classes; weights of class_weights()
    ...
    histogram: reports/lengths.png
    ...
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
