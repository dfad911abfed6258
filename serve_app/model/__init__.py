"""LlamaModel: prompt building (``prompt``, ``chat_template``, ``sandbox``), loading (``loading``), inference
(``service``) and the Ray Serve deployment (``deployment``). Import the deployment from ``.deployment``; the rest
does not need Ray running."""
