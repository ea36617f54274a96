#!/usr/bin/env python3
"""The markdown table of loadtest/run-attacks.sh: one row per attack JSON
in the given directory (written by `sealpost-loadtest attack ...`).

    python3 loadtest/attacks.py OUT_DIR [SERVER_BINARY] [STARTED_AT]
"""
import json
import sys
from pathlib import Path

ORDER = ["slots", "slow-bodies", "hash-stall", "inbox-lock", "slow-readers"]
TITLES = {
    "slots": "1. Unauthenticated socket slots",
    "slow-bodies": "2. Slow bodies",
    "hash-stall": "3. Password-hash stall",
    "inbox-lock": "7. Inbox lock",
    "slow-readers": "9. Slow readers",
}


def cell(text):
    return str(text).replace("|", "\\|").replace("\n", " ")


def main():
    out = Path(sys.argv[1])
    server = sys.argv[2] if len(sys.argv) > 2 else "?"
    started = sys.argv[3] if len(sys.argv) > 3 else "?"
    runs = {}
    for path in sorted(out.glob("*.json")):
        try:
            result = json.loads(path.read_text())
        except json.JSONDecodeError:
            continue
        if result.get("scenario") == "attack":
            runs[result["attack"]] = result
    print(f"Server `{server}`, run {started}, default limits, SQLite.\n")
    print("| Attack | Attacker | Legitimate client saw | Load (1/5/15 min) |")
    print("|---|---|---|---|")
    for name in ORDER + sorted(set(runs) - set(ORDER)):
        title = TITLES.get(name, name)
        run = runs.get(name)
        if run is None:
            if name in ORDER:
                print(f"| {title} | not run, or failed | | |")
            continue
        results = run["results"]
        summary = results.get("summary", {})
        load = results.get("loadavg_start") or "?"
        print(
            f"| {title} | {cell(summary.get('attacker', '?'))} "
            f"| {cell(summary.get('legitimate', '?'))} | {cell(load)} |"
        )


if __name__ == "__main__":
    main()
