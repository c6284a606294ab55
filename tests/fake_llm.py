"""A small local server that speaks the OpenAI chat-completions protocol (streamed),
standing in for the external LLM service we do not ship."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

ANSWER_WORDS = ["The", " answer", " is", " forty", "-two", "."]


def fake_llm_app(requests: list[dict[str, Any]], delay_s: float = 0.05) -> Starlette:
    async def completions(request: Request):
        body = await request.json()
        requests.append({"body": body, "authorization": request.headers.get("authorization")})
        if not body.get("stream"):
            return JSONResponse({"error": {"message": "this fake only streams"}}, status_code=400)

        async def events():
            for word in ANSWER_WORDS:
                await asyncio.sleep(delay_s)
                chunk = {"id": "c1", "object": "chat.completion.chunk", "model": body["model"],
                         "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}]}
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/chat/completions", completions, methods=["POST"])])
