"""The ingest ledger: a small Ray actor (no CPUs) that keeps every input's outcome.

Decode tasks and encoder actors report to it: clips decoded or the reject reason per input,
clips that failed to encode, task times and the encoder's identity. It keeps the counts that
must reconcile (inputs = sources with encoded clips + rejected sources) per shard group, so
``run_ingest`` knows when a group is complete, and in online mode it rewrites
``rejects.parquet`` on each new reject.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from dcm import latents as lt


def reject_rows(records: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Ledger reject records -> the {path, reason} rows of ``rejects.parquet``."""
    return [{"path": r["source"], "reason": r["reason"]} for r in records]


def _ledger_class() -> Any:
    import ray

    @ray.remote(num_cpus=0)
    class Ledger:
        """Outcome of every input (clips or reject), timing, and what the encoder reported."""

        def __init__(self, group_size: int, rejects_file: str = "") -> None:
            self.group_size = group_size
            self.rejects_file = rejects_file  # online mode: rewritten on each new reject
            self.groups: dict[int, dict[int, dict[str, Any]]] = defaultdict(dict)
            self.failed: dict[int, dict[tuple[int, int], dict[str, Any]]] = defaultdict(dict)
            self.times = {"decode": 0.0, "encode": 0.0}
            self.window: list[float] | None = None  # [first end, last end, first rows]
            self.encoded = 0
            self.encoder: dict[str, Any] | None = None

        def decoded(self, records: list[dict[str, Any]], seconds: float) -> None:
            fresh = []
            for r in records:
                group = self.groups[r["index"] // self.group_size]
                if r["index"] not in group:
                    group[r["index"]] = r
                    fresh.append(r)
            self.times["decode"] += seconds
            self._save_rejects([r for r in fresh if r["reason"]])

        def encode_failed(self, records: list[dict[str, Any]]) -> None:
            for r in records:
                self.failed[r["index"] // self.group_size][(r["index"], r["clip"])] = r
            self._save_rejects(records)

        def encoded_batch(self, rows: int, seconds: float, end: float) -> None:
            # Steady-state window of the encoders: from the end of the first batch (model
            # warm-up excluded) to the end of the last one, idle gaps (starved actors) included.
            if self.window is None:
                self.window = [end, end, rows]
            self.window[1] = max(self.window[1], end)
            self.encoded += rows
            self.times["encode"] += seconds

        def set_encoder(self, info: dict[str, Any]) -> None:
            if self.encoder is None:
                self.encoder = info

        def get_encoder(self) -> dict[str, Any] | None:
            return self.encoder

        def status(self, groups: list[int]) -> dict[int, dict[str, Any]]:
            return {g: self._group(g) for g in groups}

        def pop_group(self, g: int) -> dict[str, Any]:
            out = self._group(g)
            self.groups.pop(g, None)
            self.failed.pop(g, None)
            return out

        def open_groups(self) -> list[int]:
            return sorted(set(self.groups) | set(self.failed))

        def _group(self, g: int) -> dict[str, Any]:
            recs = self.groups.get(g, {})
            failed = self.failed.get(g, {})
            return {
                "inputs": len(recs),
                "expected": sum(r["clips"] for r in recs.values()) - len(failed),
                "rejects": [r for r in recs.values() if r["reason"]] + list(failed.values()),
            }

        def summary(self) -> dict[str, Any]:
            recs = [r for g in self.groups.values() for r in g.values()]
            failed = [r for f in self.failed.values() for r in f.values()]
            return {
                "inputs": len(recs),
                "clips_decoded": sum(r["clips"] for r in recs),
                "rejects": [r for r in recs if r["reason"]] + failed,
                "encoded": self.encoded,
                "times": dict(self.times),
                "steady_clips_per_s": self._steady(),
            }

        def _steady(self) -> float:
            if self.window is None or self.window[1] <= self.window[0]:
                return float("nan")
            return (self.encoded - self.window[2]) / (self.window[1] - self.window[0])

        def _save_rejects(self, new: list[dict[str, Any]]) -> None:
            if not new or not self.rejects_file:
                return
            fs, path = lt.filesystem(self.rejects_file)
            fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
            lt.write_table(fs, path, lt.rejects_table(reject_rows(self.summary()["rejects"])))

    return Ledger


def make_ledger(group_size: int, rejects_file: str = "") -> Any:
    """Start the ledger actor for groups of ``group_size`` inputs (a handle)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # On the driver's node, so that a local rejects path means this machine.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    return _ledger_class().options(scheduling_strategy=here).remote(group_size, rejects_file)
