"""Evaluation: continual-learning metrics over stage x domain matrices, balanced task orders, and run
reports (JSON + PNG)."""

from jaxcl.eval.metrics import accuracy_forgetting, average_seen, backward_transfer, bootstrap_matrix, \
    classification_scores, percentile_interval, text_draws, \
    learned_rows, mean_interval, paired_perplexity_bootstrap, perplexity_forgetting, retrieval_confusion, \
    seen_domains, summarize
from jaxcl.eval.orders import balanced_orders
from jaxcl.eval.report import build_report, format_matrix, plot_matrix, plot_memory_growth, plot_series, \
    plot_training_curves, write_report

__all__ = ["average_seen", "perplexity_forgetting", "accuracy_forgetting", "backward_transfer", "summarize",
           "seen_domains", "learned_rows", "build_report", "write_report", "format_matrix", "plot_matrix",
           "plot_training_curves", "plot_memory_growth", "plot_series", "balanced_orders", "bootstrap_matrix",
           "paired_perplexity_bootstrap", "mean_interval", "retrieval_confusion", "classification_scores",
           "text_draws", "percentile_interval"]
