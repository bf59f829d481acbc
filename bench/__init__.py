"""Benchmarks (not tests): each compares fedge against a baseline measured in the same run.

``python -m bench NAME`` runs ``bench/NAME.py`` (dashes become underscores): its ``run(quick)`` returns a
JSON-able dict, written to ``bench/results/NAME.json``; its ``render(result)`` returns the Markdown section
of ``docs/benchmarks.md``, which is regenerated from every result on disk; an optional ``plot(result, path)``
draws ``bench/results/NAME.png`` where a curve says more than a table. ``--quick`` runs the smallest
size, so CI proves each benchmark still works without waiting for real numbers (nothing is written).
"""
