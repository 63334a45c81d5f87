"""Frozen layers: layer units, the callback that freezes them, and frozen layers as the tuner's second fidelity.

:mod:`.units` splits a network into layer units; :mod:`.callback` (the only module here that imports Lightning)
trains the last ``k`` of them; :mod:`.levels` holds the trainable-fraction levels the search layer uses and
:mod:`.costs` the FLOP cost model of each level.
"""
