"""`gss prepare`, `gss train` and `gss eval`, each losing a node mid-command, on Ray's own multi-node test cluster.

Run as `python -m tests.lost_node ROOT` (its own process: it starts its own cluster). The head node runs the `gss`
commands (1 CPU); two worker nodes have 1 CPU and one `worker` slot each, so that the two training workers, and the
two scorers of `gss eval`, sit one on each. Each command runs twice from a separate `gss` process, as a user runs
it: once whole, once with worker node 2 removed mid-command (its processes killed) and a node like it added
`BACK_AFTER_S` later (a preempted VM replaced). Prints, as JSON, what the test compares: each command's output and
where its results are.
"""

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from ray.cluster_utils import Cluster

from pipeline.config import load_config
from pipeline.dataset import dataset_dir
from tests.corpus import as_overrides, fresh_process_env, run_config, write_pg19

WORKER_NODE = {"num_cpus": 1, "resources": {"worker": 1}}
BACK_AFTER_S = 8


def config(root: Path, corpus: Path) -> dict:
    tree = run_config(root, corpus, "lost-node", steps=40, checkpoint_every=10, eval_every=1000,
                      worker_resources={"CPU": 1, "worker": 1})
    tree["data"]["source"]["unit_bytes"] = 20_000  # a book a unit: units to tokenize while the node goes
    tree["eval"] = {"lengths": [64, 256], "batch_tokens": 256}  # batches to score while the node goes
    return tree


class Commands:
    def __init__(self, cluster: Cluster, root: Path):
        self.cluster, self.root = cluster, root
        self.nodes = [cluster.add_node(**WORKER_NODE) for _ in range(2)]
        cluster.wait_for_nodes()
        self.env = fresh_process_env(RAY_ADDRESS=cluster.address)

    def run(self, command: str, tree: dict, lose_node_once: Callable[[str], bool] | None = None) -> str:
        """`gss command` of `tree`: its output. With `lose_node_once`, worker node 2 is removed as soon as it holds
        for the output so far (and is checked to come before the command's end), and a new one is added later."""
        log = self.root / f"{command}-{tree['root'].rsplit('/', 1)[-1]}.log"
        with open(log, "w") as out:
            job = subprocess.Popen([sys.executable, "-m", "jobs.cli", command, *as_overrides(tree)], env=self.env,
                                   stdout=out, stderr=subprocess.STDOUT, text=True)
            if lose_node_once:
                deadline = time.time() + 300
                while not lose_node_once(log.read_text()):
                    assert job.poll() is None, f"`gss {command}` ended before the node was lost: {log.read_text()}"
                    assert time.time() < deadline, f"`gss {command}` never reached the point to lose the node"
                    time.sleep(0.05)
                self.cluster.remove_node(self.nodes.pop(), allow_graceful=False)
                time.sleep(BACK_AFTER_S)
                self.nodes.append(self.cluster.add_node(**WORKER_NODE))
            job.wait(timeout=400)
        output = log.read_text()
        assert job.returncode == 0, f"`gss {command}` failed: {output[-4000:]}"
        return output


def tokenized_units(dataset: Path) -> Callable[[str], bool]:
    """True once `gss prepare` has written one unit's sidecar (the rest still to come)."""
    return lambda _: any((dataset / "_work" / "units" / "train").glob("unit-*.json"))


def scored_a_batch(output: str) -> bool:
    """True once `gss eval`'s bar has moved: both scorers are up and busy."""
    return any(int(done) > 0 for done in re.findall(r"scorer\(s\):\s+(\d+)%", output))


def main(root: Path) -> None:
    # a node found dead within a second or two of its end (Ray's default: 15 s, longer than it is away here)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 2}})
    commands = Commands(cluster, root)
    write_pg19(root / "corpus", counts=(8, 2, 6), words=(2000, 4000))
    whole, lost = (config(root / name, root / "corpus") for name in ("whole", "lost"))
    lost_dataset = Path(dataset_dir(load_config(None, as_overrides(lost))))
    outputs = {
        "prepare-whole": commands.run("prepare", whole),
        "prepare-lost": commands.run("prepare", lost, tokenized_units(lost_dataset)),
        "train-whole": commands.run("train", whole),
        "train-lost": commands.run("train", lost, lambda _: (Path(lost["root"]) / "train" / "lost-node" /
                                                             "checkpoint_manager_snapshot.json").exists()),
        "eval-whole": commands.run("eval", whole),
        "eval-lost": commands.run("eval", lost, scored_a_batch),
    }
    print(json.dumps({"outputs": outputs, "datasets": [dataset_dir(load_config(None, as_overrides(t)))
                                                       for t in (whole, lost)]}))
    cluster.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
