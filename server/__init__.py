"""``em-inf serve``: vLLM's own ``vllm serve``, with EM-INF in its sampler.

Modules: :mod:`.cli_args` (the command line: ``vllm serve``'s plus the EM-INF
group), :mod:`.launch` (checks, defaults, clear first errors, running ``vllm
serve``), :mod:`.vllm_argv` (the ``vllm serve`` command line em-inf runs),
:mod:`.cpu_defaults` (CPU engine defaults), :mod:`.middleware` / :mod:`.requests`
(per-request ``"em_inf"`` settings, ``GET /v1/em-inf``), :mod:`.settings` (the
server's defaults), :mod:`.vllm_compat` (the vLLM internals em-inf uses, by name).
Importing this package imports nothing heavy.
"""
