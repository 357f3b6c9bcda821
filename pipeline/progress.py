"""What the terminal shows of a training run: the driver's progress bar, fed by what rank 0 logs to MLflow, and
the workers' lines for the user (Ray forwards their stderr to the driver's terminal); the rest of the workers'
output stays in Ray's logs."""

from __future__ import annotations

import concurrent.futures
import sys
import threading
import time

from pipeline.tracking import Outage, Tag, unreachable

COMPILE_KEYS = ("compile_seconds", "fx_graph_cache_hits", "fx_graph_cache_misses")  # the driver's line on them


class TrainingProgress:
    """The driver's progress bar, fed by what rank 0 logs to MLflow (the workers' own output stays in Ray's logs).
    Once the last step is in, the bar says what training still waits for (`finishing`), so that a full bar whose
    clock goes on is never silent; while MLflow does not answer, the bar says since when. The workers' notices
    (`MetricsLogger.notice`: a checkpoint they could not use) are printed as they come. With torch.compile
    (`compiled`), it says once what the workers' first compile took and how much of it Inductor's cache had. Given
    what the workers `need` of the Ray cluster, it says when the cluster's nodes have less (a node lost, or not up
    yet: Ray Train waits for them, then goes on from the last checkpoint), and when they have it again."""

    def __init__(self, tracking_uri: str, run_id: str, steps: int, tokens_per_step: int, finishing: str,
                 poll_s: float = 2.0, compiled: bool = False, need: dict[str, float] | None = None):
        from mlflow import MlflowClient

        self.client, self.tracking_uri, self.run_id, self.steps, self.tokens_per_step, self.finishing, self.poll_s = \
            MlflowClient(tracking_uri), tracking_uri, run_id, steps, tokens_per_step, finishing, poll_s
        self.started_ms = self.since_ms = int(time.time() * 1000)
        self.notices_until_ns = time.time_ns()  # the workers' notices printed so far: none of an earlier driver's
        self.compile_pending = compiled  # torch.compile's time, to say once this driver's workers have logged it
        self.stop = threading.Event()
        self.outage = Outage()  # MLflow's, as the bar's reads see it
        self.need, self.short_since = need or {}, None
        # reads run in their own daemon thread, waited for `answer_s`: one caught in MLflow's retries (minutes) when
        # the server went away would otherwise keep the bar from saying so, and once the server is back, a read
        # still asleep in those retries is left behind for a fresh one rather than waited for
        self.reading: concurrent.futures.Future | None = None
        self.reading_since, self.answer_s = 0.0, 10.0

    def __enter__(self) -> TrainingProgress:
        from tqdm import tqdm

        self.bar = tqdm(total=self.steps, desc="[train]", unit="step", dynamic_ncols=True)
        self.thread = threading.Thread(target=self._follow, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self._update()
        if self.outage.since is None:  # done waiting: the closed bar is the steps alone
            self.bar.set_description_str("[train]", refresh=False)
        self.bar.close()  # else it keeps saying why its steps stopped short (training can end inside an outage)

    def _follow(self) -> None:
        while not self.stop.wait(self.poll_s):
            self._update()

    def _update(self) -> None:
        self._check_cluster()
        why = unreachable(self.tracking_uri, timeout_s=5)
        if why is None:
            # a read that went out during an outage may sleep in MLflow's retries for minutes, however young it is:
            # once the server is back, read afresh
            stale = self.outage.since is not None or time.monotonic() - self.reading_since > self.answer_s
            if self.reading is None or self.reading.done() or stale:
                self.reading, self.reading_since = self._read_in_background(), time.monotonic()
            try:
                self._show(*self.reading.result(timeout=self.answer_s))
            except concurrent.futures.TimeoutError:
                why = f"no answer in {self.answer_s:.0f} s"
            except Exception as e:  # noqa: BLE001 - the tracking server is down: training does not need it
                why = str(e)
        if why is not None:
            if self.outage.failed():
                self.bar.write(f"[train] MLflow does not answer ({why.splitlines()[0][:160]}); training goes on")
            self.bar.set_description_str(f"[train] MLflow unreachable since {self.outage.clock()}", refresh=True)
            return
        since = self.outage.clock() if self.outage.since is not None else ""
        if self.outage.answered() is not None:
            self.bar.write(f"[train] MLflow answers again (unreachable since {since})")
            self.bar.set_description_str("[train]", refresh=False)

    def _check_cluster(self) -> None:
        if not self.need:
            return
        import ray

        have = ray.cluster_resources()  # the nodes alive now
        short = {key: value for key, value in self.need.items() if have.get(key, 0) < value}
        if short and self.short_since is None:
            self.short_since = time.strftime("%H:%M:%S")
            lacking = ", ".join(f"{key} {value:g} (the cluster has {have.get(key, 0):g})"
                                for key, value in short.items())
            self.bar.write(f"[train] waiting for the cluster: the workers need {lacking}; a node was lost or is not "
                           "up yet, and training goes on from its last checkpoint once the nodes are there")
        elif not short and self.short_since is not None:
            self.bar.write(f"[train] the cluster has room for the workers again (short since {self.short_since})")
            self.short_since = None

    def _read_in_background(self) -> concurrent.futures.Future:
        reading = concurrent.futures.Future()

        def read() -> None:
            try:
                compile_logs = {key: self.client.get_metric_history(self.run_id, key)
                                for key in COMPILE_KEYS} if self.compile_pending else {}
                run = self.client.get_run(self.run_id).data
                restarts = self.client.get_metric_history(self.run_id, "resumed_at_step")
                reading.set_result((run.metrics, run.tags, restarts, compile_logs))
            except Exception as e:  # noqa: BLE001 - handed to the waiting _update
                reading.set_exception(e)

        threading.Thread(target=read, daemon=True).start()
        return reading

    def _show(self, metrics: dict[str, float], tags: dict[str, str], restarts: list,
              compile_logs: dict[str, list]) -> None:
        notices = {int(key.removeprefix(Tag.NOTICE)): line for key, line in tags.items() if key.startswith(Tag.NOTICE)}
        for ns in sorted(ns for ns in notices if ns > self.notices_until_ns):
            self.bar.write(f"[train] {notices[ns]}")
            self.notices_until_ns = ns
        for restart in restarts:
            if restart.timestamp >= self.since_ms:
                self.bar.write(f"[train] resumed from the checkpoint at step {restart.step}")
                self.since_ms = restart.timestamp + 1
        # the first compile of this driver's workers (the run's latest values may be an earlier driver's)
        fresh = {key: [m for m in logs if m.timestamp >= self.started_ms] for key, logs in compile_logs.items()}
        if self.compile_pending and all(fresh.values()):
            self.compile_pending = False
            seconds, hits, misses = (min(fresh[key], key=lambda m: (m.timestamp, m.step)).value for key in COMPILE_KEYS)
            self.bar.write(f"[train] torch.compile compiled the model in {seconds:.1f} s; Inductor's cache had "
                           f"{hits:.0f} of its {hits + misses:.0f} graphs")
        if "tokens_seen" in metrics:
            self.bar.update(round(metrics["tokens_seen"] / self.tokens_per_step) - self.bar.n)
            shown = {"loss": f"{metrics['loss']:.3f}", "tok/s": f"{metrics['tokens_per_second']:,.0f}"}
            if "val_loss" in metrics:
                shown["val"] = f"{metrics['val_loss']:.3f}"
            if self.bar.n >= self.steps:
                self.bar.set_description_str(f"[train] {self.finishing}", refresh=False)
            self.bar.set_postfix(shown, refresh=True)


def say(line: str) -> None:
    """A training worker's line for the user."""
    print(f"[train] {line}", file=sys.stderr, flush=True)
