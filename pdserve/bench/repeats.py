"""Telling when a run resends prompts the server has seen: a repeated seed meets a warm prefix cache.

The same `--seed` gives the same prompts, so a second run against the same server finds their KV in its
prefix cache and reports a TTFT it would never see on new traffic. Two pieces of evidence, either one
enough for a warning in the report:

- history: a small local file records the fingerprint (a hash of every prompt and output length) of
  each run per server; a fingerprint already recorded for that server is a repeat;
- the server's own count: `usage.prompt_tokens_details.cached_tokens` (pdserve and vLLM send it) above
  what the run itself shares (the chat template's tokens and `--prefix-len`) came from an earlier run.

`--prefix-salt` (dataset.py mixes it into the prompts' seed) makes new prompts while the arrivals keep
their seed; `auto` draws a fresh salt each run.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pdserve.bench.client import RequestResult
    from pdserve.bench.dataset import BenchRequest

DEFAULT_HISTORY = "~/.cache/pdserve/bench_history.jsonl"
SALT_ADVICE = "pass --prefix-salt auto (or another --seed) for prompts the server has not seen"


def resolve_salt(salt: str | None) -> str | None:
    """'auto' -> a fresh random salt (stored in the report, so the run can be repeated exactly)."""
    return secrets.token_hex(4) if salt == "auto" else salt


def fingerprint(requests: Sequence[BenchRequest]) -> str:
    digest = hashlib.sha256()
    for r in requests:
        digest.update(f"{r.output_len}\0{r.prompt}\0".encode())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class History:
    """Runs sent so far, one JSON line each: server, model, prompts' fingerprint, date, label."""

    path: Path

    @classmethod
    def at(cls, path: str) -> History | None:
        return cls(Path(path).expanduser()) if path else None

    def earlier(self, base_url: str, model: str, print_: str) -> dict[str, Any] | None:
        """The latest recorded run of these prompts on this server, or None."""
        if not self.path.exists():
            return None
        found = None
        for line in self.path.read_text().splitlines():
            try:
                run = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn line from an interrupted write: not evidence either way
            if (run.get("base_url"), run.get("model"), run.get("fingerprint")) == (base_url, model, print_):
                found = run
        return found

    def record(self, base_url: str, model: str, print_: str, label: str | None) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        entry = {"base_url": base_url, "model": model, "fingerprint": print_, "date": date, "label": label}
        with self.path.open("a") as f:
            f.write(json.dumps(entry) + "\n")


def unexplained_cache_hits(results: Sequence[RequestResult], prefix_len: int) -> int:
    """Completed requests whose cached prompt tokens exceed what this run's prompts share: the
    template's tokens (server prompt_tokens - our prompt size) plus the shared prefix."""
    hits = 0
    for r in results:
        if not r.success or not r.cached_input_len:
            continue
        template = max((r.usage_input_len or r.input_len) - r.input_len, 0)
        hits += r.cached_input_len > template + prefix_len
    return hits


def repeat_warnings(earlier: dict[str, Any] | None, hits: int, completed: int) -> list[str]:
    """The report's warnings (none when neither piece of evidence says the prompts were seen)."""
    warnings = []
    if earlier is not None:
        when = earlier.get("date", "?") + (f" ({earlier['label']})" if earlier.get("label") else "")
        warnings.append(
            f"these prompts (same seed and lengths) were sent to this server before, at {when}: its "
            f"prefix cache may answer them, so TTFT reads low; {SALT_ADVICE}"
        )
    if hits:
        warnings.append(
            f"{hits} of {completed} requests found more of their prompt in the server's prefix cache "
            f"than this run shares: an earlier run sent these prompts; {SALT_ADVICE}"
        )
    return warnings
