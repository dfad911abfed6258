"""Chat output beyond plain text: tool calls and reasoning. Which format a model's chat template speaks
(``formats``), the grammars that make a call parse (``grammars``), and pure incremental parsers that turn the
generated text into content, reasoning and tool calls (``toolparse``, ``reasoning``, ``output``).
pydantic, stdlib and ``serve_app.protocol`` only: no llama.cpp here."""
