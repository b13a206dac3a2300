"""`cptlab batch` after its runs: notebooks side by side, the shifts of one notebook in turn."""

import threading
import time
from pathlib import Path

from cptlab import batch


def test_notebooks_run_two_at_a_time_and_the_shifts_of_one_in_turn(tmp_path, monkeypatch):
    running, most, seen = set(), [0], []
    lock = threading.Lock()

    def execute(path: Path, executed: Path, parameters: dict) -> bool:
        with lock:
            running.add(executed.stem)
            most[0] = max(most[0], len(running))
            seen.append((executed.stem, set(running)))
        time.sleep(0.2)
        with lock:
            running.discard(executed.stem)
        return not executed.stem.endswith("strong")

    monkeypatch.setattr(batch, "_execute", execute)
    nb = {name: tmp_path / f"{name}.ipynb" for name in ("a", "b", "c")}
    groups = [batch._notebook_runs(nb["a"], {"scale": "", "shift": ""}, "smoke", "cpu", tmp_path, None),
              batch._notebook_runs(nb["b"], {"scale": ""}, "smoke", "cpu", tmp_path, None),
              batch._notebook_runs(nb["c"], {"scale": ""}, "smoke", "cpu", tmp_path, None)]
    assert [len(g) for g in groups] == [2, 1, 1] and groups[0][1][2] == {"scale": "smoke", "shift": "strong"}
    assert batch._execute_groups(groups, 2) == ["a-strong"]
    assert most[0] == 2  # two notebooks side by side ...
    assert not any({"a-weak", "a-strong"} <= now for _, now in seen)  # ... never both shifts of one
    seen.clear()
    most[0] = 0
    assert batch._execute_groups(groups, 1) == ["a-strong"] and most[0] == 1
    assert [name for name, _ in seen] == ["a-weak", "a-strong", "b", "c"]
