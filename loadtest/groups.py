#!/usr/bin/env python3
"""Summarises run-group-benchmark.sh's results as a markdown table.

usage: groups.py OUT STARTED SERVER BACKENDS
"""
import json
import os
import sys


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def main():
    out, started, server, backends = sys.argv[1:5]
    print(f"Group messages, run {started} ({server}).\n")
    print("| backend | form | acks | group msgs confirmed | deliveries (expected) | push p50 / p99 / p99.9 ms | sent p99 ms | server CPU s | queue bytes added | per group message | rows | shared bodies |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for backend in backends.split():
        for form in ("shared", "single"):
            for ack in ("ack", "noack"):
                name = f"{backend}-{form}-{ack}"
                run = load(os.path.join(out, name + ".json"))
                before = load(os.path.join(out, name + ".before.json")) or {}
                after = load(os.path.join(out, name + ".after.json")) or {}
                if not run:
                    continue
                r = run["results"]
                push = r["push_latency"] or {}
                sent = r["send_to_sent"] or {}
                confirmed = r["group_messages_confirmed"]
                added = after.get("bytes", 0) - before.get("bytes", 0)
                per = added / confirmed if confirmed else 0
                size = run["params"]["size"]
                print(
                    f"| {backend} | {form} | {'yes' if ack == 'ack' else 'no'} | {confirmed} "
                    f"| {r['deliveries']} ({r['deliveries_expected']}) "
                    f"| {push.get('p50_ms', 0):.2f} / {push.get('p99_ms', 0):.2f} / {push.get('p999_ms', 0):.2f} "
                    f"| {sent.get('p99_ms', 0):.1f} | {r.get('server_cpu_s') or 0:.1f} "
                    f"| {added:,} | {per:,.0f} ({per / size:.1f} × body) "
                    f"| {after.get('rows', 0):,} | {after.get('shared_bodies', 0):,} |"
                )


if __name__ == "__main__":
    main()
