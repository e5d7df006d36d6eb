"""After sampling: append the token, detokenize incrementally, apply the stop rules, and build the
sequence's IncrementalOutput. Stop strings are matched on text (so across token boundaries) and cut
from the output; while a stop string could still be forming, that tail of text is held back."""

from __future__ import annotations

from seekserve.engine.outputs import IncrementalOutput, TokenLogprobs
from seekserve.engine.sequence import Sequence


def append_token(seq: Sequence, token: int, logprobs: TokenLogprobs | None, eos_token_ids: frozenset[int],
                 max_model_len: int) -> None:
    """Record a sampled token and decide whether the sequence has finished."""
    p = seq.params
    seq.token_ids.append(token)
    if logprobs is not None:
        seq.logprobs.append(logprobs)
    n_out = seq.num_output_tokens
    may_stop = n_out >= p.min_tokens
    if may_stop and token in p.stop_token_ids:
        seq.finish_reason, seq.stop_reason = "stop", token
        return                                    # the stop token's text is not part of the output
    if may_stop and not p.ignore_eos and token in eos_token_ids:
        seq.finish_reason = "stop"
        return
    seq.detokenizer.add([token])
    if may_stop and p.stop:
        _match_stop_strings(seq)
        if seq.finish_reason is not None:
            return
    if (p.max_tokens is not None and n_out >= p.max_tokens) or seq.num_tokens >= max_model_len:
        seq.finish_reason = "length"


def _match_stop_strings(seq: Sequence) -> None:
    text = seq.detokenizer.text
    longest = max(len(s) for s in seq.params.stop)
    # a new match must end inside the text added since the last check
    window_start = max(0, seq.num_emitted_chars - longest)
    best: tuple[int, str] | None = None
    for stop in seq.params.stop:
        pos = text.find(stop, window_start)
        if pos != -1 and (best is None or pos < best[0]):
            best = (pos, stop)
    if best is not None:
        seq.text_end = best[0]
        seq.finish_reason, seq.stop_reason = "stop", best[1]


def make_output(seq: Sequence) -> IncrementalOutput | None:
    """The sequence's news since its last output; None when there is nothing to report yet."""
    finished = seq.finish_reason is not None
    if finished:
        if seq.text_end is None:
            seq.detokenizer.flush()
        end = seq.text_end if seq.text_end is not None else len(seq.detokenizer.text)
    else:
        hold = max((len(s) for s in seq.params.stop), default=1) - 1
        end = max(seq.num_emitted_chars, len(seq.detokenizer.text) - hold)
    new_tokens = seq.token_ids[seq.num_prompt_tokens + seq.num_emitted_tokens:]
    if not new_tokens and end <= seq.num_emitted_chars and not finished:
        return None
    text = seq.detokenizer.text[seq.num_emitted_chars:end]
    lp = seq.logprobs[seq.num_emitted_tokens:] if seq.params.logprobs is not None else None
    seq.num_emitted_chars = max(seq.num_emitted_chars, end)
    seq.num_emitted_tokens = seq.num_output_tokens
    return IncrementalOutput(
        request_id=seq.request_id, index=seq.index, text=text, token_ids=new_tokens, logprobs=lp,
        finish_reason=seq.finish_reason, stop_reason=seq.stop_reason, num_prompt_tokens=seq.num_prompt_tokens,
        num_cached_tokens=seq.num_cached_tokens or 0, num_output_tokens=seq.num_output_tokens)
