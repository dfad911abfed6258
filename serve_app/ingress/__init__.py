"""HTTP + handle ingress over the OpenAI-compatible service."""
