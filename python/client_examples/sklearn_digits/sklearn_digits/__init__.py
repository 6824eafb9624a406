"""Rondo example: a scikit-learn ``SGDClassifier`` of handwritten digits, trained by a
federation through ``partial_fit`` and ``coef_``/``intercept_`` (:mod:`rondo.sklearn`).

Commands (see README.md): ``digits-participant`` (:mod:`.participant`), ``digits-report``
(:mod:`.report`); ``run.sh N`` runs them against a local coordinator and aggregator.
:mod:`.data` splits the data set, :mod:`.model` is the classifier and its training.
"""
