"""OpenAI's tool and reasoning shapes at the Ingress: request messages and tool fields into our protocol, and
the assistant message (content, ``reasoning_content``, ``tool_calls``) out of a finished generation."""

from __future__ import annotations

from typing import Any

from serve_app.protocol import (
    Done,
    FunctionCall,
    Message,
    NamedToolChoice,
    Tool,
    ToolCall,
    ToolCallDelta,
    ToolFunction,
)
from serve_app.schemas import ChatCompletionRequest, ChatMessage, NamedToolChoiceIn


def _message(m: ChatMessage) -> Message:
    calls = tuple(ToolCall(id=c.id, function=FunctionCall(name=c.function.name, arguments=c.function.arguments))
                  for c in m.tool_calls) if m.tool_calls else None
    # An assistant turn that only called tools has no content (None), as OpenAI sends it.
    content = None if m.content is None and calls else m.text()
    return Message(role=m.role, content=content, tool_calls=calls, tool_call_id=m.tool_call_id, name=m.name)


def chat_messages(messages: list[ChatMessage]) -> tuple[Message, ...]:
    return tuple(_message(m) for m in messages)


def tool_fields(req: ChatCompletionRequest) -> dict[str, Any]:
    """The tool and reasoning fields of a ``GenerateRequest`` (empty when the request has none)."""
    out: dict[str, Any] = {}
    if req.tools:
        out["tools"] = tuple(Tool(function=ToolFunction(name=t.function.name, description=t.function.description,
                                                        parameters=t.function.parameters)) for t in req.tools)
        out["parallel_tool_calls"] = req.parallel_tool_calls
    choice = req.tool_choice
    if isinstance(choice, NamedToolChoiceIn):
        out["tool_choice"] = NamedToolChoice(name=choice.function.name)
    elif choice is not None:
        out["tool_choice"] = choice
    if req.reasoning_format is not None:
        out["reasoning_format"] = req.reasoning_format
    if req.chat_template_kwargs:
        out["chat_template_kwargs"] = req.chat_template_kwargs
    return out


def chat_message(done: Done) -> dict[str, Any]:
    """The assistant message of a non-streamed reply."""
    msg: dict[str, Any] = {"role": "assistant", "content": done.text or ""}
    if done.reasoning:
        msg["reasoning_content"] = done.reasoning
    if done.tool_calls:
        msg["tool_calls"] = [c.model_dump() for c in done.tool_calls]
        if not done.text:
            msg["content"] = None  # OpenAI's shape for a turn that only calls tools
    return msg


def call_deltas(calls: list[ToolCallDelta]) -> list[dict[str, Any]]:
    """Streamed tool-call pieces as OpenAI sends them: index, id, type and name first; then argument text."""
    out = []
    for c in calls:
        d: dict[str, Any] = {"index": c.index}
        if c.id is not None:
            d["id"] = c.id
            d["type"] = "function"
        fn: dict[str, Any] = {"arguments": c.arguments}
        if c.name is not None:
            fn = {"name": c.name, "arguments": c.arguments}
        d["function"] = fn
        out.append(d)
    return out
