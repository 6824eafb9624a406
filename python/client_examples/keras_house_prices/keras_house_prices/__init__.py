"""Rondo example: a Keras regressor of house prices, trained by a federation.

Commands (see README.md): ``split-data`` (:mod:`.split`), ``run-participant``
(:mod:`.participant`), ``house-prices-report`` (:mod:`.report`); ``run.sh N`` runs them all
against a local coordinator and aggregator. :mod:`.data` reads, splits and preprocesses the
data (no Keras); :mod:`.model` is the network.
"""
