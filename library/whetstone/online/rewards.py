"""Turn reward-model scores of k samples per prompt into training signal: pairs and shaped rewards.

Pure numpy, so the driver, the Ray Train workers and the tests use them alike. Online DPO/IPO
trains on the best and the worst of each prompt's k samples (:func:`best_vs_worst`); every
objective can first reshape the scores against length exploitation (:func:`shape_rewards`).
"""

from __future__ import annotations

import numpy as np


def _as_matrix(rewards: np.ndarray, name: str = "rewards") -> np.ndarray:
    """(P, k) float64 copy of ``rewards``; raises naming the first row holding NaN or inf."""
    matrix = np.asarray(rewards, dtype=np.float64)
    if matrix.ndim != 2:
        raise ValueError(f"{name} must have shape (P, k), got {matrix.shape}")
    bad = ~np.isfinite(matrix)
    if bad.any():
        row, col = (int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{name}[{row}, {col}] is {matrix[row, col]}: every sample needs a finite score")
    return matrix


def best_vs_worst(rewards: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per prompt, the indices of the highest- and the lowest-scored of its k samples.

    Ties go to the lowest index on both sides (``argmax`` / ``argmin``). A prompt whose samples
    all score the same (max == min, including k = 1) expresses no preference: its ``valid`` flag
    is False and the trainer skips it and counts it.

    Args:
        rewards: scores, shape (P, k), finite.

    Returns:
        (chosen_idx (P,) int64, rejected_idx (P,) int64, valid (P,) bool).

    Raises:
        ValueError: when the shape is not (P, k) or a score is NaN or infinite (naming it).
    """
    matrix = _as_matrix(rewards)
    if matrix.shape[1] == 0:
        raise ValueError("rewards has k = 0 samples per prompt")
    chosen = np.argmax(matrix, axis=1).astype(np.int64)  # (P,)
    rejected = np.argmin(matrix, axis=1).astype(np.int64)  # (P,)
    valid = matrix.max(axis=1) > matrix.min(axis=1)  # (P,)
    return chosen, rejected, valid


def shape_rewards(
    rewards: np.ndarray,
    lengths: np.ndarray,
    length_penalty: float = 0.0,
    length_normalise: bool = False,
) -> np.ndarray:
    """Reshape scores against a reward model that pays for length.

    Two guards, applied in this order:

    1. ``length_normalise``: fit ``reward ~ a + slope * length`` by least squares over all P*k
       samples of the batch and remove the length-explained part, ``reward - slope * (length -
       mean length)``; the batch mean reward is unchanged and what is left no longer correlates
       with length. A batch whose lengths are all equal has slope 0.
    2. ``length_penalty``: subtract ``length_penalty * length`` (tokens), an explicit price per
       token. It comes second because a penalty linear in length would otherwise be fitted and
       removed again by step 1.

    With neither, the rewards come back unchanged (as float32).

    Args:
        rewards: scores, shape (P, k), finite.
        lengths: completion lengths in tokens, shape (P, k), integers >= 0.
        length_penalty: reward taken off per token, >= 0.
        length_normalise: remove the least-squares length trend.

    Returns:
        Shaped rewards, shape (P, k), float32.
    """
    matrix = _as_matrix(rewards)
    tokens = np.asarray(lengths)
    if tokens.shape != matrix.shape:
        raise ValueError(f"lengths must have the shape of rewards {matrix.shape}, got {tokens.shape}")
    if tokens.size and (not np.issubdtype(tokens.dtype, np.integer) or tokens.min() < 0):
        raise ValueError(f"lengths must be integers >= 0, got dtype {tokens.dtype}, min {tokens.min()}")
    if not np.isfinite(length_penalty) or length_penalty < 0:
        raise ValueError(f"length_penalty must be finite and >= 0, got {length_penalty}")
    tokens = tokens.astype(np.float64)
    if length_normalise and matrix.size:
        centred = tokens - tokens.mean()  # (P, k)
        spread = float((centred**2).sum())
        slope = float((centred * (matrix - matrix.mean())).sum()) / spread if spread > 0 else 0.0
        matrix = matrix - slope * centred
    if length_penalty:
        matrix = matrix - length_penalty * tokens
    return matrix.astype(np.float32)


def above_or_below_mean(rewards: np.ndarray, rtol: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """Online KTO's labels: ``(desirable, labelled)``, both (P, k) bool. A sample is desirable
    above its prompt's mean reward and undesirable below it; one equal to the mean (within
    ``rtol`` of the group's reward range, computed in float64) is left unlabelled, and so is every
    sample of a group whose rewards are all equal (float32 means of equal values can miss them by
    an ulp, which would label a tied group all one way)."""
    values = np.asarray(rewards, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"rewards must be (P, k), got shape {values.shape}")
    centred = values - values.mean(axis=1, keepdims=True)  # (P, k)
    spread = values.max(axis=1, keepdims=True) - values.min(axis=1, keepdims=True)  # (P, 1)
    labelled = (np.abs(centred) > rtol * spread) & (spread > 0)
    return (centred > 0) & labelled, labelled
