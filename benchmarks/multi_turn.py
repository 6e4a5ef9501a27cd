"""A multi-turn chat workload against a running cluster: what prefix affinity saves.

    python benchmarks/multi_turn.py --base-url http://127.0.0.1:8000 --conversations 64 --turns 6 \
        --label cache_aware --output multi_turn-cache_aware.json

Each conversation shares one system prompt and grows turn by turn: the assistant's answer and a new
user message are appended, so turn t's prompt extends turn t-1's. Conversations run concurrently
(`--concurrency` at a time), the turns of one conversation in order. Reported: TTFT per turn
(streamed, client side), and from the instances' /metrics, before and after the run:

    prompt tokens             the prompts' total (the same for every policy)
    prefill tokens computed   prefill instances: prompt tokens run through the model (the rest were
                              prefix-cache hits there)
    KV bytes received         decode instances: KV moved from prefill to decode
    decode-reused tokens      decode instances: prompt tokens whose KV the decode already held

The instances are found through the router's /router/instances.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from typing import Any

import httpx

from pdserve.router.metrics import metric_sum

SYSTEM = (
    "You are a careful assistant for a travel agency. Answer briefly and concretely; when a question "
    "is ambiguous, state the assumption you make. Prices are in euros; distances in kilometres. "
) * 4
TOPICS = ["Lisbon", "Kyoto", "Oslo", "Cairo", "Lima", "Hanoi", "Quebec", "Tbilisi"]
QUESTIONS = [
    "What should I see first in {t}?",
    "How many days are enough for {t}?",
    "Which month is best to visit {t}, and why?",
    "Name a dish I must try in {t}.",
    "How do I get from the airport to the centre of {t}?",
    "What is a good day trip from {t}?",
    "Is {t} expensive compared with Paris?",
    "Which neighbourhood of {t} suits a family?",
]


async def _counters(client: httpx.AsyncClient, base: str) -> dict[str, float]:
    listing = (await client.get(f"{base}/router/instances")).json()
    instances = listing.get("instances", listing) if isinstance(listing, dict) else listing
    out = {"prefill_computed": 0.0, "kv_bytes_received": 0.0, "decode_reused": 0.0, "prompt_tokens": 0.0}
    for inst in instances:
        text = (await client.get(f"{inst['url']}/metrics")).text
        if inst.get("role") == "prefill":
            out["prefill_computed"] += metric_sum(text, "pdserve_prompt_tokens_computed")
        if inst.get("role") == "decode":
            out["kv_bytes_received"] += metric_sum(
                text, "pdserve_kv_transfer_bytes_total", direction="received"
            )
            out["decode_reused"] += metric_sum(text, "pdserve_kv_reused_tokens_total")
            out["prompt_tokens"] += metric_sum(text, "pdserve_prompt_tokens_total")
    return out


async def _turn(
    client: httpx.AsyncClient, base: str, model: str, messages: list[dict], max_tokens: int
) -> tuple[float, str]:
    body = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
    }
    start = time.perf_counter()
    ttft = None
    text = []
    async with client.stream("POST", f"{base}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            delta = json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
            if delta and ttft is None:
                ttft = time.perf_counter() - start
            text.append(delta)
    return (ttft if ttft is not None else time.perf_counter() - start), "".join(text)


async def _conversation(
    client: httpx.AsyncClient, base: str, model: str, index: int, turns: int, max_tokens: int
) -> list[float]:
    rng = random.Random(index)
    topic = TOPICS[index % len(TOPICS)]
    messages: list[dict[str, str]] = [{"role": "system", "content": SYSTEM}]
    ttfts = []
    for question in rng.sample(QUESTIONS, turns):
        messages.append({"role": "user", "content": f"(traveller {index}) " + question.format(t=topic)})
        ttft, answer = await _turn(client, base, model, messages, max_tokens)
        ttfts.append(ttft)
        messages.append({"role": "assistant", "content": answer})
    return ttfts


async def run(args: argparse.Namespace) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    base = args.base_url.rstrip("/")
    async with httpx.AsyncClient(timeout=600, headers=headers) as client:
        model = (await client.get(f"{base}/v1/models")).json()["data"][0]["id"]
        before = await _counters(client, base)
        gate = asyncio.Semaphore(args.concurrency)

        async def one(i: int) -> list[float]:
            async with gate:
                return await _conversation(client, base, model, i, args.turns, args.max_tokens)

        start = time.perf_counter()
        per_conversation = await asyncio.gather(*(one(i) for i in range(args.conversations)))
        elapsed = time.perf_counter() - start
        after = await _counters(client, base)
    by_turn = [[c[t] for c in per_conversation] for t in range(args.turns)]
    flat = sorted(x for c in per_conversation for x in c)
    return {
        "label": args.label,
        "conversations": args.conversations,
        "turns": args.turns,
        "max_tokens": args.max_tokens,
        "concurrency": args.concurrency,
        "elapsed_s": elapsed,
        "ttft_mean_s": statistics.fmean(flat),
        "ttft_p90_s": flat[int(0.9 * (len(flat) - 1))],
        "ttft_mean_by_turn_s": [statistics.fmean(t) for t in by_turn],
        **{k: after[k] - before[k] for k in after},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="the router")
    p.add_argument("--api-key", default=None, help="the cluster's API key, if it has one")
    p.add_argument("--conversations", type=int, default=64, help="conversations in the run")
    p.add_argument("--turns", type=int, default=6, help="turns of each conversation (at most 8)")
    p.add_argument("--max-tokens", type=int, default=32, help="of each answer")
    p.add_argument("--concurrency", type=int, default=8, help="conversations at a time")
    p.add_argument("--label", default="run", help="a name for this run in the JSON")
    p.add_argument("--output", default=None, help="write the result JSON here")
    args = p.parse_args()
    result = asyncio.run(run(args))
    print(json.dumps(result, indent=2))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
