"""The trace simulator (issue 13 item 5): a discrete-event model of a splitserve cluster
whose costs come from measurement (planner/profile.py), replaying a request trace
(planner/trace.py) with the planner's own policy or a static P:D.

Where the parts are:
- sim_decode.py: a decode instance (continuous batching, chunked local prefill, epochs);
- sim_prefill.py: the prefill pool (FCFS work queue, transfer, KVReady);
- sim_cluster.py: the router and the real offload rule, instances starting, draining and
  flipping roles, the planner's Observation and Plan;
- sim_run.py: the event loop and the controllers;
- sim_report.py: attainment, goodput, instance-seconds, JSON, table and plot.
"""

from __future__ import annotations

from splitserve.planner.sim_report import format_table, plot, summarize, table, timeline_json
from splitserve.planner.sim_run import (
    SimResult,
    SimSettings,
    StaticController,
    StaticError,
    TimelinePoint,
    parse_pd,
    simulate,
)

__all__ = ["SimResult", "SimSettings", "StaticController", "StaticError", "TimelinePoint",
           "format_table", "parse_pd", "plot", "simulate", "summarize", "table",
           "timeline_json"]
