"""DeepSeek-R1 reasoning parser: splits generated text into `reasoning_content` (inside <think>...</think>)
and `content`, incrementally, with tags that may arrive split across deltas. R1 templates open the <think>
block in the prompt, so generation may start inside it; text is reasoning until </think> appears."""

from __future__ import annotations

THINK_START, THINK_END = "<think>", "</think>"


class ReasoningSplitter:
    def __init__(self, starts_in_reasoning: bool) -> None:
        self.in_reasoning = starts_in_reasoning
        self._seen_any = False        # a leading <think> is only meaningful at the very start
        self._pending = ""            # held back: could be the start of a tag
        self._after_end = False       # whitespace right after </think> is not content

    def feed(self, delta: str) -> tuple[str, str]:
        """Returns (reasoning delta, content delta)."""
        text = self._pending + delta
        self._pending = ""
        reasoning, content = [], []
        while text:
            if not self._seen_any and not self.in_reasoning:
                stripped = text.lstrip()
                if THINK_START.startswith(stripped) and len(stripped) < len(THINK_START):
                    self._pending = text          # maybe "<thi" of a leading <think>: wait
                    return "".join(reasoning), "".join(content)
                if stripped.startswith(THINK_START):
                    self.in_reasoning = True
                    text = stripped[len(THINK_START):]
                self._seen_any = True
                continue
            self._seen_any = True
            if not self.in_reasoning:
                if self._after_end:
                    text = text.lstrip()
                    self._after_end = not text
                content.append(text)
                break
            end = text.find(THINK_END)
            if end != -1:
                reasoning.append(text[:end])
                text = text[end + len(THINK_END):]
                self.in_reasoning, self._after_end = False, True
                continue
            keep = _partial_suffix(text, THINK_END)
            reasoning.append(text[:len(text) - keep])
            self._pending = text[len(text) - keep:]
            break
        return "".join(reasoning), "".join(content)

    def flush(self) -> tuple[str, str]:
        """At the end: a held-back fragment was not a tag after all."""
        text, self._pending = self._pending, ""
        return (text, "") if self.in_reasoning else ("", text)


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of tag."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
