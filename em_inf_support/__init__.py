"""What the tests and the benchmarks share, in one place: starting and stopping a
real ``em-inf serve``, reading its JSON routes and its Prometheus ``/metrics``,
building the tiny random model they serve, and vLLM-like decoding steps on a GPU
(``gpu_steps``).

bench never imports the tests, and the tests import bench only where bench's own
code is what they test (its answer extraction, its scripts); what both use lives
here. It is not
part of em-inf's wheel (pyproject's ``packages`` leave it out): it is imported from
the checkout's root, where ``python -m pytest`` (pyproject's ``pythonpath``) and
``python -m bench.<script>`` both run, with em-inf itself installed from the same
checkout (``pip install -e .``).
"""
