"""The book's experiments: their configurations, runs, stored results and plots.

* :mod:`effarch.experiments.recall` -- the recall-memory trade-off (chapter 2.5): a
  :class:`~effarch.models.TinyLM` per mixer and state size trained on MQAR
  (:func:`recall_experiment`, sizes :data:`RECALL_CPU` and :data:`RECALL_GPU`), the stored
  CPU-size run and its plot; ``python -m effarch.experiments recall`` runs it from the command
  line (:mod:`effarch.experiments.__main__`).
* :mod:`effarch.experiments.linearization` -- turning a softmax layer into a linear one
  (chapter 2.6): attention transfer, low-rank fine-tuning, a stand-in teacher and the sweep.

Experiments sit on top of the package: they use :mod:`effarch.models`, the families and
:mod:`effarch.train`, and nothing below imports them.
"""

from .linearization import (
    LinearizationTask,
    TransferResult,
    attention_transfer,
    linearization_sweep,
    linearization_task,
    low_rank_finetune,
)
from .recall import (
    RECALL_CPU,
    RECALL_GPU,
    RecallConfig,
    plot_recall_tradeoff,
    recall_experiment,
    recall_table,
    stored_recall_records,
)

__all__ = [
    "RECALL_CPU",
    "RECALL_GPU",
    "LinearizationTask",
    "RecallConfig",
    "TransferResult",
    "attention_transfer",
    "linearization_sweep",
    "linearization_task",
    "low_rank_finetune",
    "plot_recall_tradeoff",
    "recall_experiment",
    "recall_table",
    "stored_recall_records",
]
