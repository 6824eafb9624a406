"""Aggregation rules written in Python, run inside the Rondo aggregator.

With ``strategy = "python"`` the aggregator imports ``[aggregation.python] module``,
instantiates its class ``class`` once with ``[aggregation.options]`` as keyword arguments, and
then, every training round, calls :meth:`Aggregator.start_round`, :meth:`Aggregator.add_update`
for each accepted update and :meth:`Aggregator.finish_round` for the next global model. The
class must subclass :class:`Aggregator`.

Reference rules, written plainly to start from: :mod:`.weighted_average` (FedAvg, streaming),
:mod:`.median` and :mod:`.trimmed_mean` (Yin et al. 2018), :mod:`.krum` (Blanchard et al. 2017),
:mod:`.fedadam` (Reddi et al. 2021).
"""

from .base import Aggregator, Update, Weights

__version__ = "0.1.0"

__all__ = ["Aggregator", "Update", "Weights", "__version__"]
