"""Small datasets for tests: chat examples a tiny model can learn, as JSON lines."""

from __future__ import annotations

import json


def chat_lines(n: int, *, offset: int = 0) -> list[dict[str, object]]:
    """n small chat examples that a tiny model can learn (a fixed answer per key)."""
    return [{"messages": [{"role": "system", "content": "You map codes to colours."},
                          {"role": "user", "content": f"code {i + offset}"},
                          {"role": "assistant", "content": ["red", "blue", "green"][(i + offset) % 3]}]}
            for i in range(n)]


def jsonl(rows: list[dict[str, object]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def preference_lines(n: int, *, offset: int = 0) -> list[dict[str, object]]:
    """n preference (DPO) pairs on the same task: the preferred answer is the key's colour, the other the next one."""
    colours = ["red", "blue", "green"]
    return [{"input": {"messages": [{"role": "system", "content": "You map codes to colours."},
                                    {"role": "user", "content": f"code {i + offset}"}]},
             "preferred_output": [{"role": "assistant", "content": colours[(i + offset) % 3]}],
             "non_preferred_output": [{"role": "assistant", "content": colours[(i + offset + 1) % 3]}]}
            for i in range(n)]
