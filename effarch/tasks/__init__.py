"""Synthetic tasks that probe what a token mixer can do.

* :func:`mqar`: multi-query associative recall (Arora et al., 2023), the task behind the
  recall-memory trade-off: keys bound to values early in a sequence, asked for later.
* :func:`memory_stream`: a stream of key-value bindings for memories trained at test time.
* :func:`perm_copy`: a permutation then its copy, whose validity and likelihood are exact
  (the diffusion chapter's parallel-decoding test);
* :func:`load_digits`: scikit-learn's bundled 8x8 digits, as floats or grey-level tokens,
  with :data:`DIGIT_NAMES` and a fixed :func:`digits_split`;
* :func:`planted_lines`: a 2-D task whose answer lies along columns (or rows), for scan
  orders over images;
* :func:`touch_tones`: telephone key presses on raw 16 kHz audio, labelled per sample,
  scored per press by :func:`tone_accuracy` (chapter 8.2's streaming task);
* :func:`recall_accuracy`: the fraction of queries answered right.
* :func:`stdlib_corpus`: real text every machine has (the standard library's sources),
  split into training and held-out files; :func:`byte_batches` cuts windows from it.

The experiment that trains small models on it is
:func:`effarch.experiments.recall_experiment`; ``python -m effarch.experiments recall`` runs
it from the command line.
"""

from .digits import DIGIT_NAMES, digits_split, load_digits, quantize
from .grid import longest_run, planted_lines
from .mqar import IGNORE_INDEX, MQARBatch, mqar, recall_accuracy
from .permutation import perm_copy, perm_copy_oracle, perm_copy_valid
from .stream import MemoryStream, memory_stream
from .text import BOS, TextCorpus, byte_batches, heldout_windows, stdlib_corpus
from .tones import (
    DTMF_COLS,
    DTMF_KEYS,
    DTMF_ROWS,
    SAMPLE_RATE,
    ToneBatch,
    dtmf_frequencies,
    keys_from_labels,
    tone_accuracy,
    touch_tones,
)

__all__ = [
    "DTMF_COLS",
    "DTMF_KEYS",
    "DTMF_ROWS",
    "SAMPLE_RATE",
    "ToneBatch",
    "dtmf_frequencies",
    "keys_from_labels",
    "tone_accuracy",
    "touch_tones",
    "BOS",
    "DIGIT_NAMES",
    "IGNORE_INDEX",
    "MQARBatch",
    "MemoryStream",
    "TextCorpus",
    "byte_batches",
    "digits_split",
    "heldout_windows",
    "load_digits",
    "longest_run",
    "memory_stream",
    "mqar",
    "perm_copy",
    "perm_copy_oracle",
    "perm_copy_valid",
    "planted_lines",
    "quantize",
    "recall_accuracy",
    "stdlib_corpus",
]
