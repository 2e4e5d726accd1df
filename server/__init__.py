"""``em-inf serve``: vLLM's OpenAI-compatible server with EM-INF in its sampler.

Modules: :mod:`.cli_args` (the command line), :mod:`.launch` (start-up, defaults,
clear first errors), :mod:`.app` (vLLM's app plus ``GET /v1/em-inf``),
:mod:`.middleware` / :mod:`.requests` (per-request ``"em_inf"`` settings),
:mod:`.settings` (the server's defaults), :mod:`.vllm_compat` (vLLM import paths).
Importing this package imports nothing heavy.
"""
