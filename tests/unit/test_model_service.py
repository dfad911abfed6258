"""LlamaModel's inference logic without Ray or a model: one generate path for chat and completions, prompt
building and its limits (checked before any engine work), chat templates and their fallbacks, admission batches,
and blocking prompt work kept off the event loop. The engine and the model are fakes
(``tests/support/fake_model.py``); the real ones are covered by the integration tests."""

from __future__ import annotations

import threading

import pytest

from serve_app.engine import EngineRequest
from serve_app.errors import (
    ContextOverflowError,
    InvalidRequestError,
    QueueFullError,
)
from serve_app.protocol import (
    Delta,
    DetokenizeCall,
    Done,
    ErrorEvent,
    GenerateRequest,
    Message,
    SamplingParams,
    Text,
    TokenizeCall,
    Tokens,
)
from tests.support.fake_model import VOCAB, Harness, chat, events, run


def test_loads_in_the_background_then_serves_chat_and_completion_on_one_path() -> None:
    async def main() -> None:
        h = Harness()
        assert (await h.service.info()).state == "loading"
        svc = await h.ready()
        info = await svc.info()
        assert info.state == "ready" and info.reason is None and info.n_ctx_seq == 64 and info.plan == {"n_ctx": 256}
        assert h.fetches == ["ensure"] and h.loads == ["/tmp/volume/blobs/m.gguf"]
        evs = await events(svc, chat(("user", "hi")))
        assert [type(e) for e in evs] == [Delta, Done]
        assert "".join(e.text for e in evs if isinstance(e, Delta)) == "hello there"
        prompt_text = h.vocab.detokenize(h.engine.submitted[0].prompt)
        assert prompt_text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        done = await svc.complete(GenerateRequest(label="r2", prompt="abc"))
        assert isinstance(done, Done) and done.text == "hello there"
        assert h.engine.submitted[1].prompt == [1, 3 + ord("a"), 3 + ord("b"), 3 + ord("c")]
        assert h.engine.submitted[1].stream is False

    run(main())


@pytest.mark.parametrize("req, code", [
    (GenerateRequest(label="r", prompt="x" * 63), "context_length_exceeded"),  # 63 + BOS = n_ctx_seq
    (GenerateRequest(label="r", prompt=(5,) * 64), "context_length_exceeded"),
    (GenerateRequest(label="r", prompt=()), "context_length_exceeded"),
    (GenerateRequest(label="r", prompt=(VOCAB + 1,)), "context_length_exceeded"),
])
def test_prompt_limits_refuse_before_any_engine_work(req: GenerateRequest, code: str) -> None:
    async def main() -> None:
        h = Harness(n_ctx_seq=64)
        svc = await h.ready()
        out = await svc.complete(req)
        assert isinstance(out, ErrorEvent) and out.error.code == code, out
        assert h.engine.submitted == []
        ok = await svc.complete(GenerateRequest(label="r", prompt="x" * 62))
        assert isinstance(ok, Done)

    run(main())


def test_chat_too_long_for_the_context_is_refused() -> None:
    async def main() -> None:
        svc = await Harness(n_ctx_seq=32).ready()
        out = await svc.complete(chat(("user", "y" * 40)))
        assert isinstance(out, ErrorEvent) and isinstance(out.error, ContextOverflowError)

    run(main())


def test_fallback_template_end_marker_is_a_stop_string_for_chats_only() -> None:
    async def main() -> None:
        h = Harness()
        svc = await h.ready()
        await svc.complete(chat(("user", "hi"), stop=("###",)))
        await svc.complete(GenerateRequest(label="r", prompt="hi"))
        assert h.engine.submitted[0].params.stop == ("###", "<|im_end|>")
        assert h.engine.submitted[1].params.stop == ()

    run(main())


def test_gemma_without_a_template_gets_gemma_turns() -> None:
    async def main() -> None:
        h = Harness(arch="gemma3", n_ctx_seq=256)
        svc = await h.ready()
        await svc.complete(chat(("system", "be brief"), ("user", "hi")))
        text = h.vocab.detokenize(h.engine.submitted[0].prompt)
        assert text == "<s><start_of_turn>user\nbe brief\n\nhi<end_of_turn>\n<start_of_turn>model\n"
        assert h.engine.submitted[0].params.stop == ("<end_of_turn>",)
        assert h.engine.submitted[0].prompt[0] != 1  # the template wrote the BOS text: no second BOS added

    run(main())


def test_gguf_template_that_does_not_compile_falls_back() -> None:
    async def main() -> None:
        h = Harness(template="{% for %}")
        svc = await h.ready()
        assert (await svc.info()).state == "ready"
        assert svc.loader.loaded is not None and svc.loader.loaded.prompts.template.is_fallback

    run(main())


def test_template_error_is_a_400_naming_the_configured_template() -> None:
    async def main() -> None:
        h = Harness(args={"server": {"chat_template": "{{ messages[5]['content'] }}"}})
        svc = await h.ready()
        out = await svc.complete(chat(("user", "hi")))
        assert isinstance(out, ErrorEvent) and out.error.status == 400
        assert "server.chat_template" in out.error.message
        assert (await svc.info()).state == "ready" and svc.health_problem() is None

    run(main())


def test_tokenize_and_detokenize_run_off_the_event_loop() -> None:
    async def main() -> None:
        h = Harness()
        svc = await h.ready()
        tok = await svc.tokenize(TokenizeCall(text="abc", add_special=False))
        assert tok == Tokens(tokens=(3 + 97, 3 + 98, 3 + 99))
        assert await svc.detokenize(DetokenizeCall(tokens=tok.tokens)) == Text(content="abc")
        bad = await svc.detokenize(DetokenizeCall(tokens=(VOCAB,)))
        assert isinstance(bad, ErrorEvent) and bad.error.param == "tokens"
        chat_tokens = await svc.tokenize(TokenizeCall(messages=(Message(role="user", content="x"),)))
        assert isinstance(chat_tokens, Tokens)
        await svc.complete(chat(("user", "hi")))
        assert h.vocab.threads and threading.current_thread().name not in h.vocab.threads
        assert all(name.startswith("prompt") for name in h.vocab.threads)

    run(main())


def test_batched_admission_enters_together_and_falls_back_one_by_one() -> None:
    async def main() -> None:
        from serve_app.engine import RequestStream

        h = Harness(queue=2)
        svc = await h.ready()
        streams = [RequestStream(f"r{i}", [5, 6], SamplingParams()) for i in range(2)]
        assert svc.submit_together(streams) == [None, None] and h.engine.commands == 1
        more = [RequestStream(f"s{i}", [5, 6], SamplingParams()) for i in range(2)]
        h.engine.submitted.clear()
        h.engine.queue = 1
        out = svc.submit_together(more)
        assert out[0] is None and isinstance(out[1], QueueFullError)

    run(main())


def test_one_bad_request_in_an_admission_batch_fails_alone() -> None:
    async def main() -> None:
        from serve_app.engine import RequestStream

        h = Harness()
        svc = await h.ready()
        real_submit = h.engine.submit

        def picky(reqs: list[EngineRequest]) -> None:  # as the real engine: checks every request before any
            if any(r.label == "bad" for r in reqs):
                raise InvalidRequestError("not this one", param="prompt")
            real_submit(reqs)

        h.engine.submit = picky  # type: ignore[method-assign]
        streams = [RequestStream(label, [5, 6], SamplingParams()) for label in ("good", "bad", "fine")]
        out = svc.submit_together(streams)
        assert out[0] is None and isinstance(out[1], InvalidRequestError) and out[2] is None
        assert [r.label for r in h.engine.submitted] == ["good", "fine"]

    run(main())
