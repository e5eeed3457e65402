"""`zeromesh bench {pubsub,pushpull,reqrep,spool}`: throughput and latency, like `nats bench`.

A user's tool on the public `AsyncNode` API (the scripts in benchmarks/ are
our raw-pyzmq comparisons): `_roles` the two ends of each pattern, `_run`
the orchestration, `_stats` the figures, `_report` the progress line, table
and JSON.
"""

from ._run import run

__all__ = ["run"]
