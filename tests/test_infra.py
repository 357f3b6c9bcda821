"""The cluster and Kubernetes files (ray_cluster.yaml, infra/), checked offline: no cloud, no Ray cluster.

- ray_cluster.yaml goes through what `ray up` does before its first cloud call (prepare_config, the GCP
  provider's TPU resource fill-out, validate_config) and the GCP provider's TPU checks; the RayCluster goes
  through the KubeRay autoscaler's own translation and validation;
- every manifest parses and carries the settings the design relies on (infra/README.md);
- every `gss` command, `configs/*.yaml` file and pip extra `.[x]` these files name exists;
- no credential is in them, and no Ray port (dashboard 8265, client 10001, GCS 6379) is open to the internet.
"""

from __future__ import annotations

import copy
import re
import types
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "ray_cluster.yaml"
INFRA = REPO / "infra"
RAY_PORTS = (8265, 10001, 6379)  # dashboard + job API, Ray client, GCS


def infra_files() -> list[Path]:
    """ray_cluster.yaml and every file under infra/."""
    return [CLUSTER, *sorted(p for p in INFRA.rglob("*") if p.is_file() and "__pycache__" not in p.parts)]


def yaml_files() -> list[Path]:
    return [p for p in infra_files() if p.suffix in (".yaml", ".yml")]


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def load_docs(path: Path) -> list:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def k8s_docs() -> list[tuple[Path, dict]]:
    return [(path, doc) for path in yaml_files() if path != CLUSTER for doc in load_docs(path)]


def the_doc(kind: str) -> dict:
    docs = [doc for _, doc in k8s_docs() if doc.get("kind") == kind]
    assert len(docs) == 1, f"expected one {kind} under infra/, found {len(docs)}"
    return docs[0]


def walk(node):
    """Every mapping and list in a parsed YAML document."""
    if isinstance(node, (dict, list)):
        yield node
        for child in node.values() if isinstance(node, dict) else node:
            yield from walk(child)


def scan_texts(text: str, is_yaml: bool) -> list[str]:
    """The text, comments included, plus, for YAML, each list of words joined as a command line
    (`command: [gss, submit, ...]`)."""
    out = [text]
    if is_yaml:
        for doc in yaml.safe_load_all(text):
            out += [" ".join(map(str, node)) for node in walk(doc)
                    if isinstance(node, list) and node and all(isinstance(x, (str, int)) for x in node)]
    return out


def texts(path: Path) -> list[str]:
    return scan_texts(path.read_text(), path.suffix in (".yaml", ".yml"))


# ---------------------------------------------------------------------------------------------------
# What the files name: `gss` commands, configs, pip extras of this project.

# `gss <command>`, but not paths (/home/ray/gss train), names (gss-ray, gss:cpu) or URLs (gs://B/gss).
_GSS_COMMAND = re.compile(r"(?<![\w./@:~$=-])gss[ \t]+([a-z][a-z0-9_-]*)")
_CONFIG = re.compile(r"\bconfigs/[\w.-]+\.ya?ml\b")
# `.[tpu]`, `/home/ray/gss[tpu]`, `gss-pipeline[tpu]`; not other packages' extras (`ray[default]`).
_PROJECT_EXTRAS = re.compile(r"(?:^|[\s'\"(=])(?:\.|[~\w./-]*/gss|gss-pipeline)\[([\w,\s-]+)\]")


def gss_commands(text: str) -> list[str]:
    return _GSS_COMMAND.findall(text)


def config_paths(text: str) -> list[str]:
    return _CONFIG.findall(text)


def project_extras(text: str) -> list[str]:
    return [extra.strip() for group in _PROJECT_EXTRAS.findall(text) for extra in group.split(",") if extra.strip()]


def named(scan) -> dict[str, set[str]]:
    """What `scan` finds in any infra file -> the files naming it."""
    found: dict[str, set[str]] = {}
    for path in infra_files():
        for text in texts(path):
            for name in scan(text):
                found.setdefault(name, set()).add(rel(path))
    return found


@pytest.fixture(scope="module")
def cli_commands() -> set[str]:
    from jobs.cli import command_names

    return set(command_names())


def _pyproject() -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        from pip._vendor import tomli as tomllib
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def ray_pin() -> str:
    pins = [m.group(1) for dep in _pyproject()["project"]["dependencies"]
            if (m := re.fullmatch(r"ray(?:\[[^\]]*\])?==([\d.]+)", dep.replace(" ", "")))]
    assert len(pins) == 1, "pyproject.toml should pin ray exactly once"
    return pins[0]


def test_scanners_find_bogus_names():
    """The checks below can fail: each scanner finds a made-up name, and leaves lookalikes alone."""
    assert gss_commands("- cd /home/ray/gss && gss frobnicate configs/paper-pg19.yaml") == ["frobnicate"]
    assert gss_commands("gss submit --address http://h:8265 -- gss reeval configs/x.yaml") == ["submit", "reeval"]
    assert gss_commands("image: gss:cpu  sa: gss-ray-head@p  root: gs://B/gss  /home/ray/gss train") == []
    joined = scan_texts("command: [gss, submit, '--', gss, frobnicate]", is_yaml=True)
    assert "frobnicate" in [c for t in joined for c in gss_commands(t)]
    assert config_paths("gss train /home/ray/gss/configs/nope.yaml") == ["configs/nope.yaml"]
    assert project_extras("pip install -e '.[gpu]' 'ray[default]==2.60.0' /home/ray/gss[tpu,dev]") == [
        "gpu", "tpu", "dev"]


def test_named_gss_commands_exist(cli_commands):
    found = named(gss_commands)
    assert {"submit", "reeval"} <= set(found), f"the scanner missed commands the manifests use: {found}"
    unknown = {command: sorted(files) for command, files in found.items() if command not in cli_commands}
    assert not unknown, (f"`gss` commands named in infra files but not in jobs/cli.py build_parser() "
                         f"({', '.join(sorted(cli_commands))}): {unknown}")


def test_named_configs_exist():
    found = named(config_paths)
    assert "configs/paper-pg19.yaml" in found
    missing = {path: sorted(files) for path, files in found.items() if not (REPO / path).is_file()}
    assert not missing, f"config files named in infra files that do not exist: {missing}"


def test_named_pip_extras_exist():
    extras = set(_pyproject()["project"]["optional-dependencies"])
    found = named(project_extras)
    assert "tpu" in found
    unknown = {extra: sorted(files) for extra, files in found.items() if extra not in extras}
    assert not unknown, f"project extras named in infra files but not in pyproject.toml ({extras}): {unknown}"


# ---------------------------------------------------------------------------------------------------
# ray_cluster.yaml through Ray's own code


@pytest.fixture(scope="module")
def gcp() -> types.SimpleNamespace:
    """ray.autoscaler._private.gcp: `config` (TPU checks), `GCPNodeType`, `GCPNodeProvider`."""
    from ray.autoscaler._private.gcp import config, node, node_provider  # imports the Google API client (dev extra)
    return types.SimpleNamespace(config=config, NodeType=node.GCPNodeType, Provider=node_provider.GCPNodeProvider)


@pytest.fixture(scope="module")
def raw_cluster() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


@pytest.fixture(scope="module")
def cluster(raw_cluster, gcp) -> dict:
    """The config as `ray up` has it just before its first cloud call (commands._bootstrap_config):
    Ray's GCP defaults merged in, per-type bounds filled, TPU head resources added, schema-validated."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(raw_cluster))
    config = gcp.Provider.fillout_available_node_types_resources(config)  # `ray up` only warns if this fails
    validate_config(config)
    return config


def node_types(cluster: dict, gcp, kind) -> dict[str, dict]:
    return {name: spec for name, spec in cluster["available_node_types"].items()
            if gcp.config.get_node_type(spec["node_config"]) == kind}


def test_ray_cluster_passes_rays_validation(cluster, gcp):
    from ray.autoscaler._private.util import check_legacy_fields

    check_legacy_fields(cluster)  # the first step of bootstrap_gcp
    assert cluster["provider"]["type"] == "gcp"
    assert gcp.config._has_tpus_in_node_configs(cluster)
    assert not gcp.config._is_head_node_a_tpu(cluster)  # TPU VMs cannot be the head
    head = cluster["available_node_types"][cluster["head_node_type"]]
    assert head["resources"] == {"CPU": 0} and head["max_workers"] == 0
    for name, spec in cluster["available_node_types"].items():
        if name != cluster["head_node_type"]:
            assert 0 == spec["min_workers"] <= 1 <= spec["max_workers"] <= cluster["max_workers"], name
    assert cluster["idle_timeout_minutes"] <= 15


def test_tpu_node_types(cluster, gcp):
    """A v4-8 host and a multi-host v4 slice, checked with the GCP provider's own TPU functions."""
    from ray._private.accelerators import tpu
    from ray._private.accelerators.tpu import TPUAcceleratorManager

    single_host = {}
    for name, spec in node_types(cluster, gcp, gcp.NodeType.TPU).items():
        node = spec["node_config"]
        gcp.config._validate_tpu_config(node)
        if "acceleratorConfig" in node:
            accelerator = gcp.config.tpu_accelerator_config_to_type(node["acceleratorConfig"])
            assert node["acceleratorConfig"]["topology"] in tpu.VALID_TPU_TOPOLOGY[accelerator.split("-")[0]]
        else:
            accelerator = node["acceleratorType"]
        assert TPUAcceleratorManager.is_valid_tpu_accelerator_type(accelerator), (name, accelerator)
        chips_per_host = tpu.get_num_tpu_visible_chips_per_host(accelerator)
        hosts = gcp.config._get_num_tpu_chips(node) / chips_per_host
        single_host[accelerator] = gcp.config._is_single_host_tpu(node)
        assert single_host[accelerator] == (hosts == 1)
        assert spec["resources"]["TPU"] == chips_per_host, f"{name}: Ray's TPU resource is the chips of one host"
        assert spec["resources"][f"TPU-{accelerator}-head"] == 1, "filled in by GCPNodeProvider"
        assert node["runtimeVersion"] and "machineType" not in node
        assert node.get("schedulingConfig", {}).get("spot") or node.get("schedulingConfig", {}).get("preemptible")
    assert single_host == {"v4-8": True, "v4-32": False}


def test_rays_checks_bite(cluster, gcp):
    """The validators used above are Ray's real ones: they reject broken configs."""
    import jsonschema
    from ray.autoscaler._private.util import validate_config

    with pytest.raises(ValueError, match="cannot both be set"):
        gcp.config._validate_tpu_config({"acceleratorType": "v4-8",
                                         "acceleratorConfig": {"type": "V4", "topology": "2x2x1"}})
    with pytest.raises(ValueError, match="topology"):
        gcp.config._validate_tpu_config({"acceleratorConfig": {"type": "V4", "topology": "2-2-2"}})
    with pytest.raises(ValueError):
        gcp.config.get_node_type({"acceleratorType": "v4-8x"})
    broken = copy.deepcopy(cluster)
    broken["available_node_types"]["tpu_v4_8"]["min_workers"] = "2"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(broken)
    broken = copy.deepcopy(cluster)
    broken["max_workers"] = 0
    broken["available_node_types"]["cpu"]["min_workers"] = 1
    with pytest.raises(ValueError, match="max_workers"):
        validate_config(broken)


def test_gpu_and_cpu_node_types(cluster, gcp):
    compute = node_types(cluster, gcp, gcp.NodeType.COMPUTE)
    assert cluster["head_node_type"] in compute
    gpus = {name: spec for name, spec in compute.items() if spec["resources"].get("GPU")}
    assert gpus, "a GPU worker type"
    for name, spec in gpus.items():
        node = spec["node_config"]
        assert spec["resources"]["GPU"] == sum(a["acceleratorCount"] for a in node["guestAccelerators"])
        assert re.fullmatch(r"a[23]-highgpu-\dg", node["machineType"])
        assert node["scheduling"]["onHostMaintenance"] == "TERMINATE", "GPU VMs cannot live-migrate"
    for name, spec in compute.items():
        boot = [d for d in spec["node_config"]["disks"] if d.get("boot")]
        assert len(boot) == 1 and boot[0]["initializeParams"]["sourceImage"], name


def test_the_h100_recipe_fits_one_node_of_each_cluster(cluster):
    """The 8-worker CUDA run that each paper config lists lands on one gpu_h100x8 VM (ray_cluster.yaml) or one
    gpu-h100x8 pod (KubeRay): a GPU per worker, all eight on one node so that NCCL goes over NVLink."""
    from pipeline.config import load_config
    from pipeline.train import scaling_config
    from tests.test_tpu import listed_overrides

    node = cluster["available_node_types"]["gpu_h100x8"]
    [accelerator] = node["node_config"]["guestAccelerators"]
    assert accelerator["acceleratorType"] == "nvidia-h100-80gb"
    assert node["node_config"]["machineType"] == "a3-highgpu-8g"
    [pod] = [g for g in the_doc("RayCluster")["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu-h100x8"]
    assert pod["template"]["spec"]["nodeSelector"]["cloud.google.com/gke-accelerator"] == "nvidia-h100-80gb"
    pod_gpus = int(pod["template"]["spec"]["containers"][0]["resources"]["requests"]["nvidia.com/gpu"])
    for path in sorted((REPO / "configs").glob("paper-*.yaml")):
        [run] = [o for o in listed_overrides(path) if "train.backend=cuda" in o]
        tc = load_config(path, run).train
        scaling = scaling_config(tc)
        assert scaling.use_gpu and scaling.accelerator_type == "H100" and tc.model["ssm_kernel"] == "fft", path.name
        assert tc.num_workers * scaling._resources_per_worker_not_none["GPU"] == node["resources"]["GPU"] == pod_gpus


def test_every_node_runs_as_its_own_service_account(raw_cluster):
    """Never the Compute Engine default account (Editor on the project), and never a key in the file."""
    assert "gcp_credentials" not in raw_cluster["provider"]
    assert raw_cluster["provider"]["project_id"] == "YOUR-PROJECT"
    for name, spec in raw_cluster["available_node_types"].items():
        accounts = spec["node_config"]["serviceAccounts"]
        role = "head" if name == raw_cluster["head_node_type"] else "worker"
        assert [a["email"] for a in accounts] == [f"gss-ray-{role}@YOUR-PROJECT.iam.gserviceaccount.com"], name


def _makefile_torch_pin() -> str | None:
    match = re.search(r"pip install -q torch==([\d.]+)", (REPO / "Makefile").read_text())
    return match.group(1) if match else None


def test_each_node_kind_installs_its_torch_then_the_project(cluster, gcp):
    """Head and CPU workers: torch's CPU build, then the project; GPU workers: PyPI's (CUDA) torch, then the
    project with the `gpu` extra (NVML); TPU hosts: the `tpu` extra (torch + torch_xla 2.9). Ray as pyproject
    pins it, everywhere."""
    commands = {name: spec["worker_setup_commands"] for name, spec in cluster["available_node_types"].items()
                if name != cluster["head_node_type"]}
    commands[cluster["head_node_type"]] = cluster["head_setup_commands"]
    tpus = node_types(cluster, gcp, gcp.NodeType.TPU)
    cpu_index = "--index-url https://download.pytorch.org/whl/cpu"
    for name, lines in commands.items():
        spec = cluster["available_node_types"][name]
        project = [i for i, line in enumerate(lines) if re.search(r"cd /home/ray/gss && pip install .*-e ", line)]
        assert len(project) == 1, f"{name}: install the project once: {lines}"
        install = lines[project[0]]
        assert f"'ray[default]=={ray_pin()}'" in install, name
        torch = [i for i, line in enumerate(lines) if re.search(r"pip install .*\btorch==", line)]
        if name in tpus:
            assert "-e '.[tpu]'" in install and not torch, f"{name}: the tpu extra pins torch and torch_xla"
            continue
        gpu = spec["resources"].get("GPU", 0) > 0
        if gpu:
            assert "-e '.[gpu]'" in install, f"{name}: the gpu extra (NVML for the GPU system metrics)"
        else:
            assert re.search(r"-e \.( |$)", install), f"{name}: the project without extras"
        assert len(torch) == 1 and torch[0] < project[0], f"{name}: torch before the project: {lines}"
        pin = re.search(r"torch==([\d.]+)", lines[torch[0]]).group(1)
        assert pin == (_makefile_torch_pin() or pin), "the torch of the CPU test lane (Makefile)"
        assert (cpu_index in lines[torch[0]]) != gpu, f"{name}: {'CUDA' if gpu else 'CPU'} build of torch"
    assert "google-api-python-client" in " ".join(commands[cluster["head_node_type"]]), "the autoscaler's GCP client"


def test_the_project_is_copied_to_every_node(raw_cluster):
    assert raw_cluster["file_mounts"] == {"/home/ray/gss": "."}
    assert raw_cluster["auth"]["ssh_user"] == "ray"  # home /home/ray, as in the rayproject/ray images
    assert {".venv", ".venv-xla"} <= set(raw_cluster["rsync_exclude"])


def test_dashboard_listens_on_the_head_only(cluster):
    start = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start and "0.0.0.0" not in start


# Ray's token authentication. The token: one Secret Manager secret for the VMs (written to ~/.ray/auth_token, the
# file Ray reads when RAY_AUTH_TOKEN and RAY_AUTH_TOKEN_PATH are unset), the Kubernetes Secret made from it for the
# pods (KubeRay's key for the token is `auth_token`). RAY_AUTH_MODE=token on every process that starts a node: a
# worker's `ray start --address` without it presents no token and the head's GCS refuses it.
RAY_TOKEN_SECRET = "gss-ray-auth-token"  # Secret Manager
RAY_TOKEN_K8S_SECRET = {"name": "ray-auth-token", "key": "auth_token"}
_FETCH_RAY_TOKEN = re.compile(
    r"\(umask 077 && mkdir -p ~/\.ray && gcloud secrets versions access latest --secret=([\w-]+) > "
    r"~/\.ray/auth_token\.new && mv ~/\.ray/auth_token\.new ~/\.ray/auth_token\)")


def test_every_vm_gets_the_token_before_ray_starts(cluster):
    """Every node type writes the token from Secret Manager (readable by its user only) in its setup, which Ray
    runs before the start commands, and starts Ray with RAY_AUTH_MODE=token: the head and each worker type."""
    setups = {name: spec["worker_setup_commands"] for name, spec in cluster["available_node_types"].items()
              if name != cluster["head_node_type"]}
    setups[cluster["head_node_type"]] = cluster["head_setup_commands"]
    assert set(setups) == set(cluster["available_node_types"])
    for name, lines in setups.items():
        fetched = [m.group(1) for line in lines if (m := _FETCH_RAY_TOKEN.fullmatch(line))]
        assert fetched == [RAY_TOKEN_SECRET], f"{name}: write the token to ~/.ray/auth_token once: {lines}"
    assert not cluster["setup_commands"] and not cluster["worker_setup_commands"], "all per node type"
    assert "grep -q RAY_AUTH_MODE ~/.bashrc || echo 'export RAY_AUTH_MODE=token' >> ~/.bashrc" in \
        cluster["initialization_commands"], "token mode in the nodes' shells too (`ray attach`, `ray exec`)"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [line for line in cluster[key] if "ray start" in line]
        assert starts and all(re.search(r"(^|;)\s*RAY_AUTH_MODE=token\s+ray start ", line) for line in starts), \
            f"{key}: RAY_AUTH_MODE=token for `ray start`: {starts}"


def _token_env(container: dict) -> dict:
    env = {e["name"]: e for e in container.get("env", [])}
    return {"mode": env.get("RAY_AUTH_MODE", {}).get("value"),
            "token": env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef")}


def test_every_pod_gets_the_token():
    """KubeRay's own token authentication (authOptions) with our Secret, and the token as env from that Secret in
    the head, every worker group, the RayJob's submitter and the CronJob that runs `gss submit`."""
    expected = {"mode": "token", "token": RAY_TOKEN_K8S_SECRET}
    ray_cluster = the_doc("RayCluster")
    spec = ray_cluster["spec"]
    assert spec["authOptions"] == {"mode": "token", "secretName": RAY_TOKEN_K8S_SECRET["name"]}
    pods = {"head": spec["headGroupSpec"]["template"]}
    pods |= {group["groupName"]: group["template"] for group in spec["workerGroupSpecs"]}
    assert len(pods) == 1 + len(spec["workerGroupSpecs"]) >= 5
    for name, template in pods.items():
        ray_container = template["spec"]["containers"][0]  # KubeRay's Ray container is the first
        assert _token_env(ray_container) == expected, name

    job = the_doc("RayJob")
    (submitter,) = job["spec"]["submitterPodTemplate"]["spec"]["containers"]
    assert _token_env(submitter) == expected, "the RayJob's submitter (`ray job submit`)"
    assert job["spec"]["submitterPodTemplate"]["spec"]["restartPolicy"] == "Never"
    cron = the_doc("CronJob")
    (container,) = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    assert container["command"][:2] == ["gss", "submit"] and _token_env(container) == expected, "the CronJob"
    # The Secret and the secret it is made from are the ones infra/README.md says how to make.
    readme = (INFRA / "README.md").read_text()
    assert f"create secret generic {RAY_TOKEN_K8S_SECRET['name']}" in readme
    assert f"--from-literal={RAY_TOKEN_K8S_SECRET['key']}=" in readme and f"--secret={RAY_TOKEN_SECRET}" in readme


# ---------------------------------------------------------------------------------------------------
# The Kubernetes manifests


def test_every_yaml_parses_and_k8s_documents_are_whole():
    assert {rel(p) for p in yaml_files()} >= {"ray_cluster.yaml", "infra/kuberay/raycluster.yaml",
                                              "infra/kuberay/rayjob-train.yaml", "infra/kuberay/reeval-cronjob.yaml",
                                              "infra/mlflow/mlflow.yaml"}
    for path in yaml_files():
        assert load_docs(path), rel(path)
    for path, doc in k8s_docs():
        assert isinstance(doc, dict) and doc.get("apiVersion") and doc.get("kind"), rel(path)
        assert doc.get("metadata", {}).get("name"), f"{rel(path)}: {doc['kind']} without a name"


def test_raycluster_through_the_kuberay_autoscaler():
    """The head's autoscaler turns the RayCluster into an autoscaling config with this very function (and
    validates it); the TPU group must come out as a 2-host v4-16 slice."""
    from ray._private.accelerators import tpu
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
    from ray.autoscaler._private.kuberay.utils import gke_tpu_accelerator_to_generation, tpu_node_selectors_to_type

    ray_cluster = the_doc("RayCluster")
    spec = ray_cluster["spec"]
    assert ray_cluster["apiVersion"] == "ray.io/v1" and spec["rayVersion"] == ray_pin()
    config = _derive_autoscaling_config_from_ray_cr(copy.deepcopy(ray_cluster))
    types_ = config["available_node_types"]
    assert types_["headgroup"]["resources"]["CPU"] == 0, "the head runs drivers, no tasks"

    tpu_groups = [g for g in spec["workerGroupSpecs"] if "google.com/tpu" in str(g)]
    assert len(tpu_groups) == 1
    group = tpu_groups[0]
    selector = group["template"]["spec"]["nodeSelector"]
    assert selector["cloud.google.com/gke-tpu-accelerator"] == "tpu-v4-podslice"
    assert selector["cloud.google.com/gke-tpu-topology"] == "2x2x2"
    generation = gke_tpu_accelerator_to_generation[selector["cloud.google.com/gke-tpu-accelerator"]]
    topology = selector["cloud.google.com/gke-tpu-topology"]
    chips_per_host = tpu.get_chips_per_host(topology, generation)
    assert group["numOfHosts"] == tpu.get_num_chips_from_topology(topology) // chips_per_host == 2
    resources = group["template"]["spec"]["containers"][0]["resources"]
    assert resources["requests"]["google.com/tpu"] == resources["limits"]["google.com/tpu"] == str(chips_per_host)
    accelerator = tpu_node_selectors_to_type(topology, selector["cloud.google.com/gke-tpu-accelerator"])
    assert accelerator == "v4-16"
    assert types_[group["groupName"]]["resources"]["TPU"] == chips_per_host
    assert types_[group["groupName"]]["resources"][f"TPU-{accelerator}-head"] == 1
    assert types_[group["groupName"]]["max_workers"] == group["maxReplicas"] * 2

    gpu_groups = [g for g in spec["workerGroupSpecs"] if "nvidia.com/gpu" in str(g)]
    assert {g["groupName"] for g in gpu_groups} == {"gpu-a100", "gpu-h100x8"}
    for group in gpu_groups:  # the autoscaler counts the pod's GPUs from its request
        assert group["template"]["spec"]["nodeSelector"]["cloud.google.com/gke-accelerator"]
        requested = group["template"]["spec"]["containers"][0]["resources"]["requests"]["nvidia.com/gpu"]
        assert types_[group["groupName"]]["resources"]["GPU"] == int(requested)
    for group in spec["workerGroupSpecs"]:
        assert 0 == group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]


def test_images_and_versions_match_the_ray_pin():
    pin = ray_pin()
    for path in infra_files():
        for text in texts(path):
            for version in re.findall(r"rayproject/ray:([\d.]+)", text) + re.findall(r"ray\[default\]==([\d.]+)", text):
                assert version == pin, f"{rel(path)}: Ray {version}, pyproject pins {pin}"
    for _, doc in k8s_docs():
        for node in walk(doc):
            if isinstance(node, dict) and isinstance(node.get("image"), str) and "/gss/gss:" in node["image"]:
                assert node["image"].rsplit(":", 1)[1] in {"cpu", "cuda", "tpu"}  # infra/Dockerfile's targets
    dockerfile = (INFRA / "Dockerfile").read_text()
    assert set(re.findall(r"^FROM \S+ AS (\w+)", dockerfile, re.MULTILINE)) >= {"cpu", "cuda", "tpu"}


def test_rayjob_and_cronjob_submit_to_the_raycluster():
    ray_cluster = the_doc("RayCluster")
    name, namespace = ray_cluster["metadata"]["name"], ray_cluster["metadata"]["namespace"]
    job = the_doc("RayJob")
    assert job["metadata"]["namespace"] == namespace
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": name}
    assert gss_commands(job["spec"]["entrypoint"])

    cron = the_doc("CronJob")
    assert cron["metadata"]["namespace"] == namespace
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    assert len(cron["spec"]["schedule"].split()) == 5
    (container,) = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    command = " ".join(container["command"])
    assert re.fullmatch(rf"gss submit --address http://{name}-head-svc:8265 -- gss reeval \S+/configs/\S+\.yaml",
                        command), command


def _flags(args: list[str]) -> dict[str, str]:
    """`--key=value` / `--key value` / `--flag` -> {key: value or ""}."""
    flags, i = {}, 0
    while i < len(args):
        key, eq, value = args[i].partition("=")
        if key.startswith("--") and not eq and i + 1 < len(args) and not args[i + 1].startswith("-"):
            value, i = args[i + 1], i + 1
        flags[key] = value
        i += 1
    return flags


def paper_config() -> dict:
    return yaml.safe_load((REPO / "configs" / "paper-pg19.yaml").read_text())


def test_mlflow_server(tmp_path, monkeypatch):
    from sqlalchemy.engine import make_url

    deployment = the_doc("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (server,) = [c for c in pod["containers"] if c["name"] == "mlflow"]
    line = server.get("command", []) + server.get("args", [])
    assert line[:2] == ["mlflow", "server"]
    flags = _flags(line[2:])
    bucket = re.match(r"gs://[^/]+", paper_config()["root"]).group(0)
    assert flags["--artifacts-destination"] == f"{bucket}/mlflow"
    assert "--serve-artifacts" in flags and flags["--app-name"] == "basic-auth"
    backend = make_url(flags["--backend-store-uri"])
    assert backend.drivername == "postgresql" and backend.password is None, "IAM database login: no password"
    proxies = [c for c in pod.get("initContainers", []) + pod["containers"] if "cloud-sql-proxy" in c["image"]]
    assert len(proxies) == 1 and "--auto-iam-authn" in proxies[0]["args"]
    env = {e["name"]: e for e in server["env"]}
    for name in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert "secretKeyRef" in env[name]["valueFrom"], name

    # The basic-auth settings, read by MLflow's own reader ("%%" is configparser's "%"). Its module is loaded
    # by path: importing the package mlflow.server.auth needs Flask-WTF, which only the server image has.
    import importlib.util

    origin = Path(importlib.util.find_spec("mlflow").origin).parent / "server" / "auth" / "config.py"
    loader = importlib.util.spec_from_file_location("_mlflow_auth_config", origin)
    auth_config = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(auth_config)

    (config_map,) = [doc for _, doc in k8s_docs() if doc["kind"] == "ConfigMap"
                     and doc["metadata"]["name"] == pod["volumes"][0]["configMap"]["name"]]
    ini = tmp_path / "basic_auth.ini"
    ini.write_text(config_map["data"]["basic_auth.ini"])
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(ini))
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_PASSWORD", raising=False)
    auth = auth_config.read_auth_config()
    assert make_url(auth.database_uri).username == backend.username == "gss-mlflow@YOUR-PROJECT.iam"
    assert auth.admin_password is None, "the admin password comes from the Secret, not the file"


def test_tracking_uri_and_bucket_match_the_configs():
    """One MLflow address and one bucket everywhere: the ones configs/paper-*.yaml name."""
    uri = paper_config()["tracking"]["uri"]
    configs = [yaml.safe_load(p.read_text()) for p in sorted((REPO / "configs").glob("paper-*.yaml"))]
    buckets = {m.group(0) for c in configs for value in (c["root"], c["data"]["source"]["path"])
               if (m := re.match(r"gs://[^/]+", value))}
    seen = []
    for path in infra_files():
        text = path.read_text()
        for value in re.findall(r"MLFLOW_TRACKING_URI=([^\s'\"`]+)", text):
            seen.append(value)
            assert value == uri, rel(path)
        for bucket in re.findall(r"gs://[\w.-]+", text):
            assert bucket in buckets, f"{rel(path)}: {bucket} is none of the configs' buckets {buckets}"
    for path, doc in k8s_docs():
        for node in walk(doc):
            if isinstance(node, dict) and node.get("name") == "MLFLOW_TRACKING_URI" and "value" in node:
                seen.append(node["value"])
                assert node["value"] == uri, rel(path)
    assert seen


# ---------------------------------------------------------------------------------------------------
# No credentials, no public Ray ports

_PRIVATE_KEY = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----|\"private_key\"\s*:|\"type\"\s*:\s*\"service_account\"")
_URL_CREDENTIALS = re.compile(r"\b[a-z][\w+.-]*://[^/\s:@'\"]+:[^/\s@'\"]+@")
# `password: x`, `PASSWORD=x`, `--secret-key=x`; a reference ($VAR, "$(...)", <placeholder>, %s) is fine
_LITERAL_SECRET = re.compile(
    r"(?i)\b[\w-]*(?:password|passwd|secret[_-]?key|api[_-]?key|(?:access|auth)[_-]?token)[\"']?[ \t]*[:=][ \t]*"
    r"(?![\"']?[$<%{*&])(?![\"']?(?:\s|$))[\"']?([^\s\"'#,;)}]+)", re.MULTILINE)
_SECRET_KEY_NAME = re.compile(
    r"(?i)(password|passwd|secret[_-]?key|api[_-]?key|token|private[_-]?key|credentials?)$")


def secret_findings(text: str, docs: list | None = None) -> list[str]:
    found = [m.group(0) for m in _PRIVATE_KEY.finditer(text)]
    found += [m.group(0) for m in _URL_CREDENTIALS.finditer(text)]
    found += [m.group(0) for m in _LITERAL_SECRET.finditer(text)]
    for doc in docs or []:
        if isinstance(doc, dict) and doc.get("kind") == "Secret" and (doc.get("data") or doc.get("stringData")):
            found.append(f"a Secret with values: {doc['metadata']['name']}")
        for node in walk(doc):
            if not isinstance(node, dict):
                continue
            if "gcp_credentials" in node:
                found.append("gcp_credentials")
            for key, value in node.items():
                if isinstance(key, str) and _SECRET_KEY_NAME.search(key) and isinstance(value, (str, int)) \
                        and not isinstance(value, bool) and value != "":
                    found.append(f"{key}: {value}")
            if isinstance(node.get("name"), str) and re.search(r"(?i)password|secret|token", node["name"]) \
                    and "value" in node:
                found.append(f"env {node['name']} with a literal value")
    return found


def test_secret_scanner_finds_secrets():
    for bad in ("password: hunter2", "export MLFLOW_TRACKING_PASSWORD=hunter2", "--flask-secret-key=abc123",
                "RAY_AUTH_TOKEN=0123abcd", "--from-literal=auth_token=0123abcd",
                "postgresql://mlflow:hunter2@127.0.0.1:5432/mlflow", "-----BEGIN RSA PRIVATE KEY-----",
                '{"type": "service_account", "private_key": "x"}'):
        assert secret_findings(bad), bad
    for bad_doc in ({"kind": "Secret", "metadata": {"name": "s"}, "stringData": {"password": "x"}},
                    {"env": [{"name": "MLFLOW_TRACKING_PASSWORD", "value": "x"}]},
                    {"env": [{"name": "RAY_AUTH_TOKEN", "value": "x"}]},
                    {"provider": {"type": "gcp", "gcp_credentials": {"type": "service_account"}}},
                    {"auth": {"admin_password": "x"}}):
        assert secret_findings("", [bad_doc]), bad_doc
    for fine in ('--from-literal=password="$(gcloud secrets versions access latest --secret=s)"',
                 "password: ${MLFLOW_PASSWORD}", "mlflow_tracking_password = %s", "- name: MLFLOW_TRACKING_PASSWORD",
                 "postgresql://gss-mlflow%40P.iam@127.0.0.1:5432/mlflow", 'password="$(cat f)"'):
        assert not secret_findings(fine), fine
    assert not secret_findings("", [{"env": [{"name": "MLFLOW_TRACKING_PASSWORD",
                                              "valueFrom": {"secretKeyRef": {"name": "c", "key": "password"}}}]}])


def test_no_secrets_in_the_files():
    for path in infra_files():
        docs = load_docs(path) if path.suffix in (".yaml", ".yml") else None
        assert not secret_findings(path.read_text(), docs), f"{rel(path)}: {secret_findings(path.read_text(), docs)}"


def _logical_lines(text: str) -> list[str]:
    return text.replace("\\\n", " ").splitlines()


def open_port_findings(text: str, docs: list | None = None) -> list[str]:
    """Ray's ports reachable from anywhere: firewall rules from 0.0.0.0/0, public Services, Ingresses,
    network policies open to the world, a RayCluster head that is not ClusterIP."""
    ports = "|".join(map(str, RAY_PORTS))
    found = [line.strip() for line in _logical_lines(text)
             if re.search(r"0\.0\.0\.0/0|::/0", line)
             and (re.search(rf"\b({ports})\b", line) or re.search(r"--allow[= ]?(all|tcp|udp)(?![:\w])", line))]
    for doc in docs or []:
        if not isinstance(doc, dict):
            continue
        kind, name = doc.get("kind"), doc.get("metadata", {}).get("name")
        spec = doc.get("spec") or {}
        if kind == "Service" and spec.get("type") in ("LoadBalancer", "NodePort"):
            exposed = {p.get(key) for p in spec.get("ports", []) for key in ("port", "targetPort")}
            if exposed & set(RAY_PORTS) or {"dashboard", "client", "gcs-server"} & exposed:
                found.append(f"Service {name} exposes a Ray port")
            annotations = doc.get("metadata", {}).get("annotations", {})
            if spec.get("type") == "NodePort" or annotations.get("networking.gke.io/load-balancer-type") != "Internal":
                found.append(f"Service {name} is reachable from outside the VPC")
        if kind in ("Ingress", "Gateway", "HTTPRoute", "GRPCRoute", "TCPRoute") and (
                re.search(rf"\b({ports})\b", str(doc)) or "head-svc" in str(doc)):
            found.append(f"{kind} {name} routes to Ray")
        if kind == "NetworkPolicy":
            for rule in spec.get("ingress", []):
                if any(peer.get("ipBlock", {}).get("cidr") in ("0.0.0.0/0", "::/0") for peer in rule.get("from", [])):
                    found.append(f"NetworkPolicy {name} admits the whole internet")
        if kind == "RayCluster":
            head = spec.get("headGroupSpec", {})
            if head.get("serviceType", "ClusterIP") != "ClusterIP" or head.get("enableIngress"):
                found.append(f"RayCluster {name}: the head is exposed")
    return found


def test_open_port_scanner_finds_open_ports():
    assert open_port_findings("gcloud compute firewall-rules create ray \\\n  --allow=tcp:8265,tcp:10001 "
                              "--source-ranges=0.0.0.0/0")
    assert open_port_findings("gcloud compute firewall-rules create all --allow=tcp --source-ranges=0.0.0.0/0")
    assert not open_port_findings("gcloud compute firewall-rules create ssh --allow=tcp:22 --source-ranges=0.0.0.0/0")
    assert not open_port_findings("gcloud compute firewall-rules create i --source-tags=t --allow=tcp,udp,icmp")
    for bad in ({"kind": "Service", "metadata": {"name": "d"},
                 "spec": {"type": "LoadBalancer", "ports": [{"port": 8265}]}},
                {"kind": "Ingress", "metadata": {"name": "i"}, "spec": {"rules": [{"http": {"paths": [
                    {"backend": {"service": {"name": "raycluster-head-svc", "port": {"number": 8265}}}}]}}]}},
                {"kind": "NetworkPolicy", "metadata": {"name": "n"}, "spec": {"ingress": [
                    {"from": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}]}},
                {"kind": "RayCluster", "metadata": {"name": "r"},
                 "spec": {"headGroupSpec": {"serviceType": "LoadBalancer"}}}):
        assert open_port_findings("", [bad]), bad


def test_no_ray_port_is_open_to_the_internet():
    for path in infra_files():
        docs = load_docs(path) if path.suffix in (".yaml", ".yml") and path != CLUSTER else None
        findings = open_port_findings(path.read_text(), docs)
        assert not findings, f"{rel(path)}: {findings}"
