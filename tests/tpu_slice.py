"""`gss train` with the xla backend on a local Ray cluster that looks like a two-host TPU v4-16 slice to Ray.

Run as `python -m tests.tpu_slice ROOT` (its own process: it starts its own cluster). Each simulated host is a
Ray node with the resources and node labels a v4 TPU VM gets ({TPU: 4}, accelerator_type:TPU-V4, the
TPU-v4-16-head resource on worker 0; ray.io/tpu-slice-name, -worker-id, -topology, -pod-type), so Ray Train's
`use_tpu` slice reservation (SlicePlacementGroup) runs exactly as on GCP; torch_xla runs on the CPU
(PJRT_DEVICE=CPU). Prints the training result as JSON.
"""

import json
import os
import sys
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

SLICE = {"ray.io/tpu-slice-name": "simulated-v4-16", "ray.io/tpu-topology": "2x2x2", "ray.io/tpu-pod-type": "v4-16",
         "ray.io/accelerator-type": "TPU-V4"}


def start_slice() -> Cluster:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    for worker_id in (0, 1):
        resources = {"TPU": 4, "accelerator_type:TPU-V4": 1, **({"TPU-v4-16-head": 1} if worker_id == 0 else {})}
        cluster.add_node(num_cpus=1, resources=resources, labels={**SLICE, "ray.io/tpu-worker-id": str(worker_id)},
                         env_vars={"TPU_NAME": SLICE["ray.io/tpu-slice-name"]})
    return cluster


def main(root: Path) -> None:
    from pipeline.config import load_config
    from pipeline.prepare import prepare
    from pipeline.train import train_stage
    from tests.corpus import TINY_MODEL, as_overrides, run_config, write_pg19

    cluster = start_slice()
    os.environ["RAY_ADDRESS"] = cluster.address
    write_pg19(root / "corpus", counts=(6, 2, 2), words=(2000, 4000))
    tree = run_config(root / "out", root / "corpus", "slice", steps=4, num_workers=2, backend="xla",
                      global_batch_tokens=512, eval_every=2, checkpoint_every=2, log_every=2)
    # two workers of {TPU: 4} on a cluster where only the two simulated hosts have TPUs: one worker per host
    tree["train"].update(worker_resources={"TPU": 4}, topology="2x2x2", accelerator_type="TPU-V4")
    tree["train"]["model"] = {**TINY_MODEL, "ssm_kernel": "chunked", "ssm_chunk": 16}
    cfg = load_config(None, as_overrides(tree))
    prepare(cfg)
    out = train_stage(cfg)
    print(json.dumps({"run_id": out["run_id"], "tracking_uri": f"sqlite:///{root / 'out' / 'mlflow.db'}"}))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
