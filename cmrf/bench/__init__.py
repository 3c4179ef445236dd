"""``cmrf bench``: TinyU-Net's speed on the CPU or a CUDA GPU against the reference, in one table.

Rows (see ``docs/benchmarks.md`` for every column):

* inference: reference eager (``cmrf.reference.reference_tinyunet``), ``torch.compile`` of it, cmrf
  default (the model as users get it), ``optimize_for_inference`` (plus a CUDA graph on CUDA),
  ONNX Runtime (CPU);
* training, one Adam step: reference eager (the model under ``reference_only()``), ``torch.compile``
  of it, cmrf default, cmrf + ``torch.compile``;
* per-cascade: CMRF's cascade at TinyU-Net's four shapes, reference against fused.

Every row is checked against its group's reference before it is timed, and every row is timed by
the one harness in ``cmrf.bench.harness``. Use::

    from cmrf.bench import resolve_settings, run_benchmark, to_markdown
    print(to_markdown(run_benchmark(resolve_settings("cpu", rows=("inference",)))))
"""

from cmrf.bench.report import Report, Row, to_json, to_markdown
from cmrf.bench.settings import BenchSettings, resolve_settings
from cmrf.bench.suite import run_benchmark

__all__ = ["BenchSettings", "Report", "Row", "resolve_settings", "run_benchmark", "to_json", "to_markdown"]
