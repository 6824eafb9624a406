"""Shared type aliases."""

from __future__ import annotations

from typing import TypeAlias

import numpy as np

Weights: TypeAlias = dict[str, np.ndarray]
"""A model: tensor name -> numpy array (float32, float64, float16, or ``ml_dtypes.bfloat16``)."""
