"""What the tests and the benchmarks share, in one place: starting and stopping a
real ``em-inf serve``, reading its JSON routes and its Prometheus ``/metrics``, and
building the tiny random model they serve.

Neither the tests nor bench import each other; both import this package. It is not
part of em-inf's wheel (pyproject's ``packages`` leave it out): it is imported from
the checkout's root, where ``python -m pytest`` (pyproject's ``pythonpath``) and
``python -m bench.<script>`` both run, with em-inf itself installed from the same
checkout (``pip install -e .``).
"""
