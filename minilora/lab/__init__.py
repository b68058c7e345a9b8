"""The workbench around the library: benchmarks, the memory ledger, experiments, plots, the demo, the
PyTorch peer and the n-gram baseline.

These modules measure and show the reference and the fast path; the library never imports them.
"""
