"""Log probabilities of generated tokens, from the logits row the token was sampled from.

Only requests that ask for them pay for them: one pass over the row (a log-sum-exp, and a partial sort for the top
alternatives) on the engine thread, while the row is still valid.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from serve_app.protocol import TokenLogprob


def _entry(tok: int, logprob: float, piece: Callable[[int], bytes]) -> TokenLogprob:
    raw = piece(tok)
    return TokenLogprob(raw.decode("utf-8", "replace"), list(raw), logprob)


def token_logprob(row: np.ndarray, tok: int, n_top: int, piece: Callable[[int], bytes]) -> TokenLogprob:
    """``tok``'s log probability and the ``n_top`` most likely tokens at this position.

    The distribution is the log-softmax of the raw row: the model's own, before repetition penalties, temperature,
    top-k/top-p/min-p and any grammar mask (what OpenAI reports; a constrained token may therefore have a low
    logprob, which says how far the constraint pulled the model)."""
    m = float(row.max())
    lse = m + float(np.log(np.exp(row - m, dtype=np.float64).sum()))
    out = _entry(tok, float(row[tok]) - lse, piece)
    if n_top > 0:
        n = min(n_top, len(row))
        idx = np.argpartition(row, len(row) - n)[len(row) - n:]
        idx = idx[np.argsort(-row[idx], kind="stable")]
        out.top = [_entry(int(i), float(row[i]) - lse, piece) for i in idx]
    return out
