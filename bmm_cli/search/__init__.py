"""``bmm search``: Bayesian optimization of the BMM hyper-parameters, scored by the user's evaluation.

The parts: :mod:`.space` (the parameters and their ranges), :mod:`.driver` (the GP loop, records, resume; with
:mod:`.state` (lock, records file, leftovers) and :mod:`.propose` (history replay, proposals)),
:mod:`.trial` (one trial where its worker lives), :mod:`.local` (the runner interface and its thread backend),
:mod:`.ray` (Ray actors), :mod:`.inmemory` (a resident model updated in place, Python scorers), :mod:`.lmeval`
(the lm-evaluation-harness scorer), :mod:`.command` (``bmm search`` itself: the loop wired to the cached BMM
solver), :mod:`.view` and :mod:`.plot` (what the user sees).
"""

from .command import search, state_dir_name
from .driver import SearchResult, run_search
from .plot import plot_convergence
from .space import LAM_GROUPS, SearchSpace, parse_range
from .trial import MARKER

__all__ = [
    "LAM_GROUPS",
    "MARKER",
    "SearchResult",
    "SearchSpace",
    "parse_range",
    "plot_convergence",
    "run_search",
    "search",
    "state_dir_name",
]
