"""Validate response bodies and SSE chunks against the ``openai`` package's own response types
(the client itself only constructs them, without validation)."""

import json

import httpx
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk


def running_as_stop(body: dict) -> dict:
    """The openai package parses streamed legacy completions into ``Completion``, whose finish_reason
    excludes null, while OpenAI's own stream sends null until the last chunk. Null (and only null)
    is checked here and the rest of the chunk validated with it read as "stop"."""
    choices = []
    for c in body["choices"]:
        assert c["finish_reason"] in (None, "stop", "length"), c
        choices.append({**c, "finish_reason": c["finish_reason"] or "stop"})
    return {**body, "choices": choices}


def validated(response: httpx.Response, chat: bool, stream: bool):
    """The typed body, or the typed chunks of an SSE body (which must end with [DONE])."""
    assert response.status_code == 200, response.text
    if not stream:
        return (ChatCompletion if chat else Completion).model_validate(response.json())
    events = response.text.split("\n\n")
    assert events[-2] == "data: [DONE]" and events[-1] == "", response.text[-300:]
    bodies = [json.loads(e[len("data: "):]) for e in events[:-2]]
    if chat:
        return [ChatCompletionChunk.model_validate(b) for b in bodies]
    return [Completion.model_validate(running_as_stop(b)) for b in bodies]


async def post_validated(app, path: str, body: dict, headers: dict | None = None):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=300) as c:
        r = await c.post(path, json=body, headers=headers or {})
    return validated(r, path.endswith("chat/completions"), bool(body.get("stream")))
