"""Tools over a labelled OUTPUT: summary, report, export, evaluation, benchmarks, the demo."""
