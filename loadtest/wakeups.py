#!/usr/bin/env python3
"""Renders the table of run-wakeup-benchmark.sh (BENCHMARKS.md, "Wake-ups
for offline devices") from the JSON results it leaves in a directory:
{backend}-{targets|notargets}-{round}.json. Medians over the rounds; each
round's send p99 is listed too, since tails are noisy.

    python3 loadtest/wakeups.py target/bench-wakeups [started-at] [server-binary]
"""

import glob
import json
import os
import re
import statistics
import sys

OUT = sys.argv[1] if len(sys.argv) > 1 else "target/bench-wakeups"
STARTED = sys.argv[2] if len(sys.argv) > 2 else None
SERVER = sys.argv[3] if len(sys.argv) > 3 else None
# Issue 26: a send is answered as fast with push targets as without.
BAR = 1.10


def runs(backend, mode):
    found = []
    for path in sorted(glob.glob(os.path.join(OUT, f"{backend}-{mode}-*.json"))):
        if not re.search(rf"{mode}-\d+\.json$", path):
            continue
        with open(path) as f:
            found.append(json.load(f))
    return found


def res(run):
    return run.get("results", {})


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(value, digits=1):
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}"


def send(run, pct):
    return (res(run).get("send_latency") or {}).get(pct)


def outcome(run, name):
    server = res(run).get("server_wakeups") or {}
    return (server.get("by_outcome") or {}).get(name)


def cores(run):
    return (res(run).get("server_cpu") or {}).get("cores")


def row(label, cells):
    return f"| {label} | " + " | ".join(cells) + " |"


def table(backend):
    plain, woken = runs(backend, "notargets"), runs(backend, "targets")
    if not plain and not woken:
        return None
    both = [plain, woken]
    lines = [
        f"### {backend}",
        "",
        "| | no targets | Web Push targets |",
        "|---|---|---|",
        row("rounds", [str(len(r)) for r in both]),
        row("achieved msgs/s (median)", [fmt(median([res(x).get("achieved_msgs_per_s") for x in r]), 0) for r in both]),
        row("confirmed `sent` (median)", [fmt(median([res(x).get("confirmed") for x in r]), 0) for r in both]),
        row("send errors", [fmt(sum(sum((res(x).get("send_errors") or {}).values()) for x in r)) for r in both]),
    ]
    for pct, name in [("p50_ms", "p50"), ("p99_ms", "p99"), ("p999_ms", "p99.9"), ("max_ms", "max")]:
        lines.append(row(f"send → `sent` {name} ms (median)", [fmt(median([send(x, pct) for x in r]), 2) for r in both]))
    lines.append(row("send p99 ms, each round", [", ".join(fmt(send(x, "p99_ms"), 2) for x in r) or "n/a" for r in both]))
    lines += [
        row("wake-ups the fake accepted (median)", [fmt(median([res(x).get("wakeups_sent") for x in r]), 0) for r in both]),
        row("devices woken / most wake-ups to one", [
            " / ".join([fmt(median([(res(x).get("fake_push") or {}).get("subscriptions_woken") for x in r]), 0),
                        fmt(max([res(x).get("wakeups_per_recipient_max") or 0 for x in r], default=None))])
            for r in both]),
        row("refused by the fake", [fmt(sum(sum(((res(x).get("fake_push") or {}).get("rejected") or {}).values()) for x in r)) for r in both]),
        # Without targets nothing can be woken, so nothing is coalesced.
        row("coalesced fraction (1 − wake-ups / messages)", ["—"] + [fmt(median([res(x).get("coalesced_fraction") for x in woken]), 4)]),
        row("server: wake-ups `sent` / `coalesced` (median)", [
            f"{fmt(median([outcome(x, 'sent') for x in r]), 0)} / {fmt(median([outcome(x, 'coalesced') for x in r]), 0)}"
            for r in both]),
        row("server: wake-ups failed / retried", [
            f"{fmt(sum(outcome(x, 'failed') or 0 for x in r))} / {fmt(sum(outcome(x, 'retried') or 0 for x in r))}"
            for r in both]),
        row("server: commit → provider's answer, mean ms", [
            fmt(median([(res(x).get("server_wakeups") or {}).get("latency_mean_ms") for x in r]), 1) for r in both]),
        row("wake-ups spread over (s, median)", [fmt(median([res(x).get("wakeup_spread_s") for x in r]), 2) for r in both]),
        row("server CPU, cores (median)", [fmt(median([cores(x) for x in r]), 2) for r in both]),
        row("load tester CPU, cores (median)", [fmt(median([(res(x).get("loadtest_cpu") or {}).get("cores") for x in r]), 2) for r in both]),
        row("1-min load average at each start", [", ".join((res(x).get("loadavg_start") or "?").split()[0] for x in r) or "n/a" for r in both]),
    ]
    p99_plain = median([send(x, "p99_ms") for x in plain])
    p99_woken = median([send(x, "p99_ms") for x in woken])
    lines.append("")
    if p99_plain and p99_woken:
        ratio = p99_woken / p99_plain
        verdict = "met" if ratio <= BAR else "**not met**"
        lines.append(
            f"**Send p99 with targets / without: {p99_woken:.2f} / {p99_plain:.2f} ms = {ratio:.3f}** "
            f"(bar: within 10 %, ≤ {BAR:.2f}): {verdict}."
        )
    else:
        lines.append("Send p99 with targets / without: n/a (a half is missing).")
    return "\n".join(lines)


def main():
    sections = [t for t in (table(b) for b in ["sqlite", "postgres"]) if t]
    head = []
    any_run = next((r for b in ["sqlite", "postgres"] for m in ["targets", "notargets"] for r in runs(b, m)), None)
    if any_run:
        p = any_run.get("params", {})
        head.append(
            f"{fmt(p.get('recipients'))} offline recipients (one device each, never connected), "
            f"{fmt(p.get('senders'))} online senders at {fmt(p.get('rate'))} msgs/s in all for {p.get('duration_s')} s, "
            f"{p.get('size')}-byte bodies, each sender's k-th message to recipient (s + k·M) mod N; "
            f"the fake Web Push service in the load tester on {p.get('fake_push')}."
        )
    if STARTED:
        head.append(f"Started {STARTED}" + (f", server `{SERVER}`." if SERVER else "."))
    print("\n".join(head + [""] + sections) if sections else "no results in " + OUT)


main()
