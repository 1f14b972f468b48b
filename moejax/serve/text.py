"""Output text of a request as it streams: incremental detokenization, stop strings, logprobs in the
shapes of the completions and chat APIs."""

from __future__ import annotations

from moejax.engine.sampling import TokenLogprobs

REPLACEMENT = "\ufffd"  # what a byte-level BPE decodes an incomplete UTF-8 sequence to


class TextStream:
    """Tokens in, text out: `add(token_ids)` returns the text that is final, holding back a partial
    UTF-8 character and whatever could still become a stop string; a stop string ends the text before
    it (`stopped`) and the tokens after the one that completed it are dropped from `token_ids` (an
    iteration of several decode steps may have made some). Without a tokenizer the text stays empty
    (token ids only)."""

    def __init__(self, tokenizer, stop: list[str] = ()):
        self.tokenizer = tokenizer
        self.stop = list(stop)
        self.token_ids: list[int] = []
        self.text = ""  # sent so far
        self.stopped = False

    def add(self, token_ids: list[int], finished: bool) -> str:
        if self.stopped or self.tokenizer is None:
            self.token_ids += token_ids
            return ""
        self.token_ids += token_ids
        full = self.tokenizer.decode(self.token_ids)
        if self.stop:
            start = max(0, len(self.text) - max(map(len, self.stop)) + 1)
            hits = [i for i in (full.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.stopped = True
                self._keep_through_stop(len(self.token_ids) - len(token_ids), start)
                return self._send(full[:min(hits)])
        end = len(full)
        if not finished:
            if full.endswith(REPLACEMENT):
                end -= 1
            if self.stop:  # a suffix that starts a stop string may still complete it
                end = min(end, max(len(self.text), len(full) - max(map(len, self.stop)) + 1))
        return self._send(full[:end])

    def _keep_through_stop(self, before: int, start: int) -> None:
        """Drop the tokens after the first of the new ones (past `before`) whose text completes a stop
        string found from text position `start`."""
        for n in range(before + 1, len(self.token_ids)):
            text = self.tokenizer.decode(self.token_ids[:n])
            if any(text.find(s, start) >= 0 for s in self.stop):
                del self.token_ids[n:]
                return

    def _send(self, upto: str) -> str:
        """The text past what was sent, up to `upto` (sent text never changes: only a held-back tail can)."""
        if len(upto) <= len(self.text):
            return ""
        new, self.text = upto[len(self.text):], upto
        return new


def token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False) if tokenizer else f"token_id:{token_id}"


def chat_logprobs(tokenizer, token_ids: list[int], logprobs: list[TokenLogprobs], k: int) -> dict:
    """{"content": [{token, logprob, bytes, top_logprobs: [...k]}]} (the chat API's shape)."""
    def entry(t: int, lp: float) -> dict:
        s = token_text(tokenizer, t)
        return {"token": s, "logprob": lp, "bytes": list(s.encode())}

    return {"content": [{**entry(t, lp.logprob),
                         "top_logprobs": [entry(i, v) for i, v in zip(lp.top_ids[:k], lp.top_logprobs[:k])]}
                        for t, lp in zip(token_ids, logprobs)]}


def completion_logprobs(tokenizer, token_ids: list[int], logprobs: list[TokenLogprobs], k: int,
                        offset: int) -> dict:
    """{tokens, token_logprobs, top_logprobs: [{token: logprob}], text_offset} (the completions API's
    shape); `offset`: the text offset of the first token."""
    tokens = [token_text(tokenizer, t) for t in token_ids]
    offsets = []
    for s in tokens:
        offsets.append(offset)
        offset += len(s)
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in logprobs],
            "top_logprobs": [{token_text(tokenizer, i): v for i, v in zip(lp.top_ids[:k], lp.top_logprobs[:k])}
                             for lp in logprobs],
            "text_offset": offsets}
