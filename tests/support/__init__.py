"""Test support: the one home of what tests (and benchmarks) share. pytest puts ``tests/`` on ``sys.path``
(``pythonpath`` in pyproject.toml), so tests import ``support.<module>``; benchmarks add ``tests/`` to theirs.

- ``common``: paths of the committed samples, ``free_port``, ``copies``, ``expected_result_uid`` (the result UID
  rule computed independently of pacs_ai), ``have_tool``.
- ``daemon_harness``: the real ``pacs-ai serve`` in a subprocess (start, SIGKILL of daemon and worker, restart,
  its job store, its CLI) and a byte-exact sender.
- ``dest_scp``: a recording pynetdicom Storage SCP (refusals, holds, TLS).
- ``orthanc``, ``postgres``, ``browser``, ``ohif``: real peers started on 127.0.0.1 (skip when not installed).
- ``model_factory``: random-weight model folders; ``predictions``: a synthetic prediction for the writers.
- ``routing_samples``, ``synthetic_fractures``, ``bad_inputs``: inputs built from the committed samples.
"""
