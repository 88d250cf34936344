"""The bench: every method against the peers on the same models, settings, inputs and machine.

grid (what runs) -> worker (one compile per process) -> tasks (quality, latency) -> store (resumable
results.json) -> report (markdown, README table) and plots.

Run it as ``python tools/bench.py``. It lives outside the core package: ``qcompiler`` never imports it,
and it is not installed (the ``bench`` extra brings its dependencies, onnxsim and matplotlib).
"""
