"""Token log probabilities in OpenAI's two shapes: chat (``choices[].logprobs.content[]``) and the legacy
completions one (parallel ``tokens`` / ``token_logprobs`` / ``top_logprobs`` / ``text_offset`` lists)."""

from __future__ import annotations

from typing import Any

from serve_app.protocol import TokenLogprob


def chat_logprobs(lps: list[TokenLogprob] | None) -> dict[str, Any] | None:
    if lps is None:
        return None
    return {"content": [
        {"token": lp.token, "logprob": lp.logprob, "bytes": lp.bytes,
         "top_logprobs": [{"token": t.token, "logprob": t.logprob, "bytes": t.bytes} for t in lp.top]}
        for lp in lps], "refusal": None}


def completion_logprobs(lps: list[TokenLogprob] | None, offset: int = 0) -> dict[str, Any] | None:
    """``offset``: where these tokens' text starts in the whole output (for a streamed chunk after the first)."""
    if lps is None:
        return None
    offsets = []
    for lp in lps:
        offsets.append(offset)
        offset += len(lp.token)
    return {"tokens": [lp.token for lp in lps], "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [{t.token: t.logprob for t in lp.top} for lp in lps], "text_offset": offsets}
