"""A synthetic colocated instance for the router's resume tests: it speaks the resume contract (R1/R2)
without a model, and fails on request, so that every way a stream can fail is reproducible.

    python -m tests.e2e.fake_instance PORT NAME

The answer to any prompt is N_TOKENS tokens, ids 1000+k, text "w{k} ". Text goes out every second
token (an odd token's event is id-only, as a held-back UTF-8 piece would be). With the header
X-PDServe-Resumable: 1 each event after new tokens carries `id: <chars>:<ids>`. A body with `resume`
continues after its output_token_ids (which must be this answer's first ones: else 400) from
text_chars_sent, without a role preamble, under its completion_id/created.

The last user message (or the prompt) says how the instance fails, e.g. "die@3": after 3 tokens of
an attempt without `resume` it breaks the connection off ("die-a@3": only the instance called a).
Kinds: die, stall (sends nothing more),
end (ends the stream without [DONE]), error:CODE (an error event); "always-" fails resumed attempts
too; a non-streamed request with any kind is answered 503 engine_dead (without `resume`); "drain-NAME":
the instance called NAME answers 503 instance_draining.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

NAME = sys.argv[2] if len(sys.argv) > 2 else "fake"
N_TOKENS = 12
PROMPT_TOKENS = 7
FIRST_ID = 1000


def piece(k: int) -> str:
    return f"w{k} "


def text_upto(k: int) -> str:
    """The text of the first k tokens."""
    return "".join(piece(i) for i in range(k))


FULL_TEXT = text_upto(N_TOKENS)
FULL_IDS = [FIRST_ID + k for k in range(N_TOKENS)]


def error(status: int, code: str) -> JSONResponse:
    body = {"error": {"message": f"fake: {code}", "type": "server_error", "param": None, "code": code}}
    return JSONResponse(body, status_code=status)


def instruction(body: dict[str, Any]) -> str:
    messages = body.get("messages")
    if isinstance(messages, list) and messages:
        return str(messages[-1].get("content", ""))
    return str(body.get("prompt", ""))


def chunk(
    body: dict[str, Any], cid: str, created: int, text: str | None, finish: str | None
) -> dict[str, Any]:
    chat = "messages" in body
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
    if chat:
        choice["delta"] = {} if text is None else {"content": text}
    else:
        choice["text"] = text or ""
    obj = "chat.completion.chunk" if chat else "text_completion"
    return {"id": cid, "object": obj, "created": created, "model": "fake", "choices": [choice]}


def sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def events(body: dict[str, Any], marks: bool, fail: re.Match[str] | None) -> AsyncIterator[str]:
    resume = body.get("resume")
    start = len(resume["output_token_ids"]) if resume else 0
    chars = resume["text_chars_sent"] if resume else 0
    cid = resume["completion_id"] if resume else f"chatcmpl-fake{time.monotonic_ns()}"
    created = resume["created"] if resume else int(time.time())
    if not resume and "messages" in body:
        role = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
        yield sse(chunk(body, cid, created, None, None) | {"choices": [role]})
    for n, k in enumerate(range(start, N_TOKENS)):
        if fail is not None and n == int(fail.group(4)) and (fail.group(1) or not resume):
            async for event in failure(fail.group(2)):
                yield event
            return
        await asyncio.sleep(0.02)
        last = k == N_TOKENS - 1
        mark = f"id: {len(text_upto(k + 1)) if (k % 2 or last) else chars}:{FIRST_ID + k}\n" if marks else ""
        if k % 2 or last:
            text = text_upto(k + 1)[chars:]
            chars = len(text_upto(k + 1))
            yield mark + sse(chunk(body, cid, created, text, "length" if last else None))
        elif marks:
            yield mark + "\n"
    usage = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": N_TOKENS}
    yield sse(chunk(body, cid, created, None, None) | {"choices": [], "usage": usage})
    yield "data: [DONE]\n\n"


async def failure(kind: str) -> AsyncIterator[str]:
    if kind == "die":
        raise ConnectionAbortedError("fake instance breaks the stream off")
    if kind == "stall":
        await asyncio.sleep(3600)
    if kind.startswith("error:"):
        code = kind.split(":", 1)[1]
        body = {"error": {"message": f"fake: {code}", "type": "server_error", "param": None, "code": code}}
        yield f"data: {json.dumps(body)}\n\ndata: [DONE]\n\n"
    # "end": the stream just ends


async def completions(request: Request) -> Response:
    body = await request.json()
    resume = body.get("resume")
    if resume is not None:
        ids = resume.get("output_token_ids")
        chars = resume.get("text_chars_sent", -1)
        if not ids or ids != FULL_IDS[: len(ids)] or not 0 <= chars <= len(text_upto(len(ids))):
            return error(400, "invalid_resume")
    how = instruction(body)
    if how == f"drain-{NAME}":
        return error(503, "instance_draining")
    fail = re.match(r"(always-)?(die|stall|end|error:\w+)(?:-(\w+))?@(\d+)$", how)
    if fail is not None and fail.group(3) not in (None, NAME):
        fail = None
    if not body.get("stream"):
        if fail is not None and resume is None:
            return error(503, "engine_dead")
        usage = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": N_TOKENS}
        message = {"role": "assistant", "content": FULL_TEXT}
        choice = {"index": 0, "message": message, "finish_reason": "length"}
        answer = {"id": "cmpl-fake", "object": "chat.completion", "created": 1, "model": "fake"}
        return JSONResponse(answer | {"usage": usage, "choices": [choice]})
    marks = request.headers.get("x-pdserve-resumable") == "1"
    return StreamingResponse(events(body, marks, fail), media_type="text/event-stream")


async def health(_: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def not_found(_: Request) -> Response:
    return JSONResponse({"error": {"message": "no", "code": None}}, status_code=404)


app = Starlette(
    routes=[
        Route("/health", health),
        Route("/pd/info", not_found),
        Route("/v1/chat/completions", completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
    ]
)

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", timeout_keep_alive=30)
