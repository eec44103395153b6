"""Crash consistency: encode (image files, and webdataset tars), index, querybank and export runs killed (SIGKILL) at 20 seeded random
write points each, then rerun; nothing may be lost, duplicated, half-written or left behind.

The kills happen in tests/crash_driver.py, one subprocess that forks a child per run and kills it at
an injected write point (durable's crash hook): a real kill, without a Python start-up per kill.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

KILLS = 20
SEED = 29


def test_kills_at_random_write_points_lose_duplicate_and_half_write_nothing(tmp_path):
    driver = Path(__file__).with_name("crash_driver.py")
    completed = subprocess.run(
        [sys.executable, str(driver), str(tmp_path / "work"), str(SEED), str(KILLS)], capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}, timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    summary = json.loads(completed.stdout.splitlines()[-1])
    for command in ("encode", "encode_tars", "index", "querybank", "export"):
        counts = summary[command]
        assert counts["kills"] == KILLS, (command, counts)
        assert counts["reruns_finished"] == KILLS, (command, counts)
        assert (counts["lost"], counts["duplicated"], counts["half_written"]) == (0, 0, 0), (command, counts)
        assert counts["leftovers"] == [] and counts["problems"] == [], (command, counts)
    # Each command writes several files, so the kills land at many different points of it.
    assert min(summary[command]["distinct_points"] for command in ("encode", "encode_tars", "index", "export")) >= 10, summary
