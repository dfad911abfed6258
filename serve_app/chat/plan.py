"""One chat request's plan: what the template is given (messages, tools), which grammar constrains sampling,
and which parsers read the output. Pure: the caller renders the template and runs the engine.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from serve_app.protocol import GenerateRequest, GrammarSpec, Message, NamedToolChoice, ReasoningFormat

from .formats import ChatFormat, Family, generic_system_prompt, tool_dicts
from .grammars import after_thinking, tool_grammar
from .output import ChatOutput
from .reasoning import CLOSE, OPEN, ThinkSplitter
from .xmlcalls import OPEN_CALL


def _arguments_value(arguments: str) -> Any:
    # Templates write a call's arguments with `| tojson`: they expect the object, as llama-server passes it.
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def template_message(m: Message) -> dict[str, Any]:
    out: dict[str, Any] = {"role": m.role, "content": m.content if m.content is not None else ""}
    if m.tool_calls:
        out["tool_calls"] = [{"id": c.id, "type": "function", "function": {
            "name": c.function.name, "arguments": _arguments_value(c.function.arguments)}} for c in m.tool_calls]
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    if m.name is not None:
        out["name"] = m.name
    return out


def _generic_message(m: Message) -> dict[str, Any]:
    """A tool turn for a template that knows no tools: the calls and results as JSON text, as llama-server's
    polyfill writes them."""
    if m.tool_calls:
        calls = [{"name": c.function.name, "arguments": _arguments_value(c.function.arguments), "id": c.id}
                 for c in m.tool_calls]
        return {"role": "assistant", "content": json.dumps({"tool_calls": calls}, ensure_ascii=False)}
    if m.role == "tool":
        result = {"tool_call_id": m.tool_call_id, "content": m.content or ""}
        return {"role": "user", "content": json.dumps({"tool_response": result}, ensure_ascii=False)}
    return template_message(m)


@dataclass
class ChatPlan:
    fmt: ChatFormat
    req: GenerateRequest
    reasoning_format: ReasoningFormat
    messages: list[dict[str, Any]] = field(default_factory=list)
    tools: list[dict[str, Any]] | None = None  # for the template; None: do not pass the variable

    @property
    def variables(self) -> dict[str, Any]:
        """More template variables: thinking on unless the request's ``chat_template_kwargs`` say otherwise
        (llama-server's default; templates that close ``<think>`` at once when it is off read it)."""
        return {"enable_thinking": True, **self.req.chat_template_kwargs}

    @property
    def tools_active(self) -> bool:
        return bool(self.req.tools) and self.req.tool_choice != "none"

    def grammar(self, prompt: str) -> GrammarSpec | None:
        """The constraint for this request given its rendered ``prompt`` (whether the template opened or closed
        the thinking already)."""
        spec = self.req.params.grammar
        choice = self.req.tool_choice
        if self.tools_active and (spec is None or choice != "auto"):
            tools = self.req.tools
            if isinstance(choice, NamedToolChoice):
                tools = tuple(t for t in tools if t.function.name == choice.name)
            spec = tool_grammar(self.fmt.family, tools, lazy=choice == "auto",
                                parallel=self.req.parallel_tool_calls and not isinstance(choice, NamedToolChoice))
        if spec is not None and self.fmt.thinking and not _closed(prompt):
            spec = after_thinking(spec)
        return spec

    def output(self, prompt: str) -> ChatOutput | None:
        """The parsers for this request's output; None when the text passes through as is."""
        think = None
        if self.reasoning_format != "none" and (self.fmt.thinking or self.req.reasoning_format == "deepseek"):
            ends = (OPEN_CALL,) if self.fmt.family is Family.XML and self.tools_active else ()
            think = ThinkSplitter(opened=prompt.rstrip().endswith(OPEN), ends=ends)
        if think is None and not self.tools_active:
            return None
        return ChatOutput(self.fmt.family, tools=self.tools_active, think=think, offered=self.req.tools)


def _closed(prompt: str) -> bool:
    # Templates with thinking switched off end the prompt with an empty "<think>\n\n</think>\n\n".
    return prompt.rstrip().endswith(CLOSE)


def plan_chat(fmt: ChatFormat, req: GenerateRequest, default_reasoning: ReasoningFormat) -> ChatPlan:
    assert req.messages is not None
    plan = ChatPlan(fmt, req, req.reasoning_format or default_reasoning)
    generic = fmt.family is Family.GENERIC
    plan.messages = [(_generic_message if generic else template_message)(m) for m in req.messages]
    if not plan.tools_active:
        return plan
    tools = tool_dicts(req.tools)
    if not generic:
        plan.tools = tools
        return plan
    prompt = generic_system_prompt(tools, req.parallel_tool_calls)
    msgs = plan.messages
    first = next((i for i, m in enumerate(msgs) if m["role"] in ("system", "user")), None)
    if first is not None and (msgs[first]["role"] == "system" or not fmt.system_role):
        # Into the system message, or, for a template without a system role, the first user turn.
        sep = "\n\n" if msgs[first]["role"] == "system" else ""
        text = msgs[first]["content"] + sep + prompt if sep else prompt + "\n\n" + msgs[first]["content"]
        msgs[first] = {**msgs[first], "content": text}
    else:
        msgs.insert(0, {"role": "system", "content": prompt})
    return plan
