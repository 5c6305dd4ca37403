"""The merge loop shared by BPE and SentencePiece-style tokenization, as llama.cpp runs it.

Both of llama.cpp's sessions (llm_tokenizer_bpe_session, llm_tokenizer_spm_session) keep the symbols of one
word in a linked list and a priority queue of adjacent pairs that may merge: BPE ranks a pair by its line in
`tokenizer.ggml.merges`, SPM by the score of the token the pair spells. The best pair is merged, ties going
to the leftmost, and the new symbol's two neighbour pairs are queued; a queued pair whose symbols have since
changed is skipped. Symbols only grow, so "changed" is "the two lengths no longer add up".
"""

from __future__ import annotations

import heapq
from collections.abc import Callable


def merge(parts: list[str], priority: Callable[[str, str], float | None]) -> list[str]:
    """Merge adjacent parts, lowest priority first (leftmost on ties); priority None means "never merge"."""
    n = len(parts)
    if n < 2:
        return parts
    parts = list(parts)
    nxt = list(range(1, n + 1))
    nxt[-1] = -1
    prv = list(range(-1, n - 1))
    queue = []
    for i in range(n - 1):
        p = priority(parts[i], parts[i + 1])
        if p is not None:
            queue.append((p, i, i + 1, len(parts[i]) + len(parts[i + 1])))
    heapq.heapify(queue)
    while queue:
        _, left, right, size = heapq.heappop(queue)
        a, b = parts[left], parts[right]
        if not a or not b or len(a) + len(b) != size:
            continue  # stale: one side was merged away or has grown
        parts[left] = merged = a + b
        parts[right] = ""
        after = nxt[left] = nxt[right]
        if after != -1:
            prv[after] = left
        before = prv[left]
        if before != -1 and (p := priority(parts[before], merged)) is not None:
            heapq.heappush(queue, (p, before, left, len(parts[before]) + len(merged)))
        if after != -1 and (p := priority(merged, parts[after])) is not None:
            heapq.heappush(queue, (p, left, after, len(merged) + len(parts[after])))
    return [part for part in parts if part]
