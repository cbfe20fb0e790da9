"""Metrics: a real HTTP scrape of /metrics shows every contract metric and values that move."""

from __future__ import annotations

import os
import socket
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from inspectd.daemon.metrics import Metrics
from inspectd.errors import InspectdError

# The list from docs/ARCHITECTURE.md (family names, as the text parser reports them).
CONTRACT_METRICS = [
    "inspectd_frames", "inspectd_deadline_misses", "inspectd_dropped_frames", "inspectd_inference_seconds",
    "inspectd_end_to_end_seconds", "inspectd_anomaly_score", "inspectd_threshold",
    "inspectd_camera_connected", "inspectd_camera_reconnects", "inspectd_incomplete_frames",
    "inspectd_engine_info", "inspectd_last_frame_timestamp_seconds", "inspectd_backend_fallbacks",
    "inspectd_engine_errors", "inspectd_archive_enabled", "inspectd_archive_errors", "inspectd_score_drift",
    "inspectd_queue_depth", "inspectd_up", "inspectd_latency_budget_seconds", "inspectd_line_state",
    "inspectd_usable_cpus", "process_cpu_seconds",
]


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(url, timeout=5) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def names(samples) -> set[str]:
    return {name for name, _ in samples}


@pytest.fixture
def served():
    m = Metrics()
    server = m.serve("127.0.0.1", 0)
    try:
        yield m, server
    finally:
        server.shutdown()


def test_every_contract_metric_is_exposed(served):
    m, server = served
    m.init_line("line1", threshold=4.5, latency_budget_s=0.05)
    m.set_engine("line1", "onnxruntime-cpu", "abc123")
    m.up.set(1)
    m.inference_seconds.labels(line="line1", backend="onnxruntime-cpu").observe(0.004)
    for metric in (m.last_frame_timestamp, m.archive_enabled, m.score_drift):
        metric.labels(line="line1").set(1)
    m.backend_fallbacks.labels(line="line1", backend="onnxruntime-cpu").inc()
    assert server.port > 0
    got = scrape(server.url)
    present = names(got)
    for family in CONTRACT_METRICS:
        assert any(n == family or n.startswith(family + "_") for n in present), family
    # Counters expose the _total suffix of the contract.
    assert ("inspectd_frames_total", (("line", "line1"), ("verdict", "NG"))) in got
    assert got[("inspectd_threshold", (("line", "line1"),))] == 4.5
    assert got[("inspectd_latency_budget_seconds", (("line", "line1"),))] == 0.05
    assert got[("inspectd_up", ())] == 1
    states = {dict(labels)["inspectd_line_state"]: v for (name, labels), v in got.items() if name == "inspectd_line_state"}
    assert states == {"starting": 1, "ok": 0, "blind": 0, "engine_failed": 0, "failing_safe": 0, "stopping": 0}


def test_values_move_between_scrapes(served):
    m, server = served
    m.init_line("line1")
    before = scrape(server.url)
    key_ng = ("inspectd_frames_total", (("line", "line1"), ("verdict", "NG")))
    assert before[key_ng] == 0
    m.observe_verdict("line1", "NG", 12.0, deadline_missed=True)
    m.observe_verdict("line1", "NG", 11.0, deadline_missed=False)
    m.end_to_end_seconds.labels(line="line1").observe(0.012)
    m.dropped_frames.labels(line="line1", reason="queue_full").inc(3)
    m.queue_depth.labels(line="line1").set(7)
    after = scrape(server.url)
    assert after[key_ng] == 2
    assert after[("inspectd_deadline_misses_total", (("line", "line1"),))] == 1
    assert after[("inspectd_dropped_frames_total", (("line", "line1"), ("reason", "queue_full")))] == 3
    assert after[("inspectd_queue_depth", (("line", "line1"),))] == 7
    assert after[("inspectd_end_to_end_seconds_count", (("line", "line1"),))] == 1
    # 0.012 s falls in the .015 bucket but not the .01 one: the contract buckets are in use.
    assert after[("inspectd_end_to_end_seconds_bucket", (("le", "0.015"), ("line", "line1")))] == 1
    assert after[("inspectd_end_to_end_seconds_bucket", (("le", "0.01"), ("line", "line1")))] == 0
    assert after[("inspectd_anomaly_score_count", (("line", "line1"),))] == 2



def test_the_daemons_cpu_time_and_usable_cpus_are_scraped(served):
    """What InspectdCpuHeadroomLow divides: the process's CPU seconds grow with the work it does,
    and the usable CPUs follow its affinity mask (taskset, CPUAffinity=) at each scrape."""
    m, server = served
    before = scrape(server.url)
    end = time.process_time() + 0.3
    while time.process_time() < end:   # 0.3 s of this process's CPU
        pass
    after = scrape(server.url)
    cpu = ("process_cpu_seconds_total", ())
    assert after[cpu] - before[cpu] >= 0.25
    usable = ("inspectd_usable_cpus", ())
    assert after[usable] == len(os.sched_getaffinity(0))
    everything = os.sched_getaffinity(0)

    def pin(cpus: set[int]) -> None:   # every thread of the process, as taskset -p -a does
        for tid in os.listdir("/proc/self/task"):
            try:
                os.sched_setaffinity(int(tid), cpus)
            except ProcessLookupError:   # a thread that ended since the listing
                pass
    try:
        pin({min(everything)})
        assert scrape(server.url)[usable] == 1
    finally:
        pin(everything)

def test_engine_info_keeps_one_series_per_line(served):
    m, server = served
    m.set_engine("line1", "tensorrt", "b1")
    m.set_engine("line2", "onnxruntime-cpu", "b1")
    m.set_engine("line1", "onnxruntime-cpu", "b1")  # fallback replaces the series
    got = scrape(server.url)
    info = {labels for name, labels in got if name == "inspectd_engine_info"}
    assert info == {
        (("backend", "onnxruntime-cpu"), ("bundle_id", "b1"), ("line", "line1")),
        (("backend", "onnxruntime-cpu"), ("bundle_id", "b1"), ("line", "line2")),
    }


def test_two_instances_do_not_collide():
    a, b = Metrics(), Metrics()
    a.frames.labels(line="x", verdict="OK").inc()
    assert b.registry.get_sample_value("inspectd_frames_total", {"line": "x", "verdict": "OK"}) is None
    assert a.registry.get_sample_value("inspectd_frames_total", {"line": "x", "verdict": "OK"}) == 1


def test_port_in_use_is_a_clear_error_and_shutdown_frees_port():
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    port = holder.getsockname()[1]
    try:
        with pytest.raises(InspectdError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            Metrics().serve("127.0.0.1", port)
    finally:
        holder.close()
    server = Metrics().serve("127.0.0.1", 0)
    port = server.port
    server.shutdown()
    again = Metrics().serve("127.0.0.1", port)  # the port was released
    again.shutdown()
