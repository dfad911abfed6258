"""The RunPod serverless worker, a thin client of the ``llm`` application's ingress (``python -m serve_app.runpod``).

* ``input``: job input shapes (worker-vllm compatible) and the limits checked before any work -> one ingress call;
* ``handler``: the job handler (one ingress call per job, errors as values) and the SDK's concurrency;
* ``bootstrap``: settings, joining or starting Ray and deploying the Serve config, waiting for the model.

The private Ray APIs it needs live in ``serve_app.ray_private``.
"""
