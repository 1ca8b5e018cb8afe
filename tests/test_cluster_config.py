"""``cluster.yaml`` passes Ray's own cluster-config checks and keeps the cluster safe; the scaling guide's commands
match the job scripts.

The AWS config goes through what ``ray up`` runs before its first cloud call (``prepare_config`` then the
``ray-schema.json`` validation); the commented on-premises variant goes through the whole of ``ray up``'s
config bootstrap, which for ``provider: type: local`` needs no network.
"""

from __future__ import annotations

import copy
import re
import shlex
import tomllib
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.commands import _bootstrap_config
from ray.autoscaler._private.util import prepare_config, validate_config

from tests.conftest import job_parser

REPO_ROOT = Path(__file__).resolve().parent.parent
CLUSTER_YAML = REPO_ROOT / "cluster.yaml"
GUIDE = REPO_ROOT / "docs" / "scaling_out.md"
ONPREM_MARKER = "ON-PREMISES VARIANT"
GPU_IMAGE = f"rayproject/ray:{ray.__version__}-py311-gpu"
CONTROL_PORTS = (6379, 8265, 10001)  # GCS, dashboard / job API, Ray Client
WORLD = {"0.0.0.0/0", "::/0"}
DRIVER_RESOURCE = "driver"  # tune.py --driver-resource in the guide


def load_aws_config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def load_onprem_config() -> dict:
    """The commented block after the ON-PREMISES VARIANT marker, with the leading ``# `` of each line removed."""
    text = CLUSTER_YAML.read_text()
    if ONPREM_MARKER not in text:
        raise ValueError(f"{CLUSTER_YAML} has no {ONPREM_MARKER!r} section")
    lines = text.split(ONPREM_MARKER, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# cluster_name:"))
    return yaml.safe_load("\n".join(line[2:] if line.startswith("# ") else "" for line in lines[start:]))


@pytest.fixture(scope="module")
def aws() -> dict:
    """The AWS config as ``ray up`` sees it after preparation (defaults merged, per-type worker limits filled)."""
    prepared = prepare_config(copy.deepcopy(load_aws_config()))
    validate_config(prepared)
    return prepared


@pytest.fixture(scope="module")
def onprem() -> dict:
    return _bootstrap_config(copy.deepcopy(load_onprem_config()), no_config_cache=True)


@pytest.fixture(scope="module", params=["aws", "onprem"])
def config(request) -> dict:
    return request.getfixturevalue(request.param)


# ------------------------------------------------------------------------------------------ Ray's validation


def test_aws_config_passes_rays_validation(aws):
    types = aws["available_node_types"]
    assert aws["provider"]["type"] == "aws" and aws["head_node_type"] in types
    workers = {name: t for name, t in types.items() if name != aws["head_node_type"]}
    assert types[aws["head_node_type"]]["max_workers"] == 0
    assert workers and all(t["min_workers"] == 0 and t["max_workers"] > 0 for t in workers.values())
    assert sum(t["max_workers"] for t in workers.values()) <= aws["max_workers"]
    assert aws["idle_timeout_minutes"] > 0  # idle workers are ended


def test_onprem_variant_passes_ray_ups_bootstrap(onprem):
    assert onprem["provider"]["type"] == "local"
    assert onprem["provider"]["head_ip"] and onprem["provider"]["worker_ips"]
    (node_type,) = onprem["available_node_types"].values()  # prepare_local made one type of the worker_ips
    assert node_type["max_workers"] == len(onprem["provider"]["worker_ips"])


@pytest.mark.parametrize(
    "break_config",
    [
        lambda c: c["docker"].update(imgae="typo"),
        lambda c: c["available_node_types"]["head"].update(resources={"CPU": -1}),
        lambda c: c.update(head_start_ray_command=["ray start --head"]),
    ],
    ids=["docker-typo", "negative-resource", "unknown-key"],
)
def test_the_validation_used_here_rejects_a_broken_config(break_config):
    raw = load_aws_config()
    break_config(raw)
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(raw))


# ------------------------------------------------------------------------------------------ safety


def _start_commands(cfg: dict) -> dict[str, str]:
    """``{"head": cmd, "worker": cmd}``: the command of each list that starts Ray."""
    out = {}
    for role in ("head", "worker"):
        (cmd,) = [c for c in cfg[f"{role}_start_ray_commands"] if "ray start" in c]
        out[role] = " ".join(cmd.split())
    return out


def test_every_ray_start_has_token_auth_and_no_usage_stats(config):
    mounts = config["file_mounts"]
    for role, cmd in _start_commands(config).items():
        env, _, start = cmd.partition("ray start")
        assert re.search(r"\bRAY_AUTH_MODE=token\b", env), f"{role}: token auth is not on before `ray start`"
        token_path = re.search(r"\bRAY_AUTH_TOKEN_PATH=(\S+?);?\s", env)
        assert token_path, f"{role}: no RAY_AUTH_TOKEN_PATH"
        assert token_path.group(1) in mounts, (
            f"{role}: the token file {token_path.group(1)} is not in file_mounts"
        )
        assert "--disable-usage-stats" in start, role


def test_token_comes_from_a_local_secret_outside_the_repository(config):
    (token_file,) = [local for remote, local in config["file_mounts"].items() if "token" in remote]
    assert token_file.startswith("~/"), token_file  # each user's own file, e.g. ~/.ray/ich-cluster.token
    assert not Path(token_file).expanduser().resolve().is_relative_to(REPO_ROOT)


def test_dashboard_listens_on_the_heads_loopback_only(config):
    head = _start_commands(config)["head"]
    assert "--dashboard-host=127.0.0.1" in head
    every_command = yaml.safe_dump(config)
    assert "0.0.0.0" not in every_command.replace("0.0.0.0/0", "")  # no service bound to all interfaces
    for option in config["docker"].get("run_options", []):
        assert not re.match(r"(-p|--publish)\b", option), f"docker publishes a port: {option}"


def world_open_rules(ip_permissions: list[dict]) -> list[dict]:
    """Rules that admit traffic from anywhere on the internet."""
    open_rules = []
    for rule in ip_permissions:
        cidrs = {r.get("CidrIp") for r in rule.get("IpRanges", [])} | {
            r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])
        }
        if cidrs & WORLD:
            open_rules.append(rule)
    return open_rules


def opens_a_control_port(rule: dict) -> bool:
    if rule.get("IpProtocol") in ("-1", -1, "all"):
        return True
    low, high = rule.get("FromPort", 0), rule.get("ToPort", 65535)
    return any(low <= port <= high for port in CONTROL_PORTS)


def test_security_group_admits_only_ssh_from_the_internet(aws):
    rules = aws["provider"]["security_group"]["IpPermissions"]
    for rule in world_open_rules(rules):
        assert not opens_a_control_port(rule), f"open to the internet: {rule}"
        assert (rule.get("IpProtocol"), rule.get("FromPort"), rule.get("ToPort")) == ("tcp", 22, 22), rule
    for node_type in aws["available_node_types"].values():
        assert "SecurityGroupIds" not in node_type["node_config"]  # every node in the one group checked above


@pytest.mark.parametrize(
    "rule",
    [
        {"IpProtocol": "tcp", "FromPort": 8265, "ToPort": 8265, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]},
        {"IpProtocol": "tcp", "FromPort": 6000, "ToPort": 11000, "Ipv6Ranges": [{"CidrIpv6": "::/0"}]},
        {"IpProtocol": "-1", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]},
    ],
)
def test_the_security_check_catches_open_control_ports(rule):
    ssh_from_office = {
        "IpProtocol": "tcp",
        "FromPort": 22,
        "ToPort": 22,
        "IpRanges": [{"CidrIp": "203.0.113.0/24"}],
    }
    assert world_open_rules([ssh_from_office, rule]) == [rule] and opens_a_control_port(rule)


def test_head_is_on_demand_and_the_only_home_of_trial_drivers(aws):
    types = aws["available_node_types"]
    head = types[aws["head_node_type"]]
    assert "InstanceMarketOptions" not in head["node_config"], "the head must not be a spot instance"
    assert head["resources"]["CPU"] == 0 and head["resources"][DRIVER_RESOURCE] > 0
    for name, node_type in types.items():
        if name == aws["head_node_type"]:
            continue
        assert DRIVER_RESOURCE not in node_type["resources"], f"{name} could host trial drivers"
        assert node_type["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot", name
        assert node_type["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::"), name  # S3


def test_gpu_workers_use_the_ray_gpu_image_of_the_installed_version(aws):
    assert GPU_IMAGE == "rayproject/ray:2.60.0-py311-gpu"
    docker = aws["docker"]
    gpu_types = {n: t for n, t in aws["available_node_types"].items() if t["resources"].get("GPU", 0) > 0}
    assert {t["node_config"]["InstanceType"].split(".")[0] for t in gpu_types.values()} >= {"g5", "p4d"}
    for node_type in gpu_types.values():
        image = (
            node_type.get("docker", {}).get("worker_image") or docker.get("worker_image") or docker["image"]
        )
        assert image == GPU_IMAGE


def test_setup_installs_this_package_with_its_pins(config):
    repo_mount = next(remote for remote, local in config["file_mounts"].items() if local == ".")
    assert any(re.search(rf"pip install .*-e {re.escape(repo_mount)}\b", c) for c in config["setup_commands"])
    assert ".gitignore" in config["rsync_filter"]  # .venv/ and runs/ stay home
    dependencies = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert {"torch==2.14.1", "torchvision==0.29.1", f"ray[default,tune,train]=={ray.__version__}"} <= set(
        dependencies
    )


# ------------------------------------------------------------------------------------------ the guide


def guide_commands() -> list[list[str]]:
    """The ``ray ...`` commands of the guide's fenced bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", GUIDE.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.startswith("ray "):
                commands.append(shlex.split(line, comments=True))
    return commands


def job_commands(script: str) -> list[list[str]]:
    """Arguments after ``python ray_jobs/<script>`` of every ``ray job submit`` in the guide."""
    out = []
    for words in guide_commands():
        if words[:3] == ["ray", "job", "submit"] and f"ray_jobs/{script}" in words:
            out.append(words[words.index(f"ray_jobs/{script}") + 1 :])
    return out


def option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_guide_goes_from_ray_up_to_ray_down():
    commands = [" ".join(w) for w in guide_commands()]

    def first(prefix: str) -> int:
        return next(i for i, c in enumerate(commands) if c.startswith(prefix))

    order = [first("ray up cluster.yaml"), first("ray dashboard cluster.yaml"), first("ray job submit"),
             first("ray down cluster.yaml")]  # fmt: skip
    assert order == sorted(order)
    assert [s for s in ("preprocess.py", "tune.py", "ensemble.py") if not job_commands(s)] == []


def test_every_job_goes_through_the_tunnel_with_the_working_dir():
    submits = [w for w in guide_commands() if w[:3] == ["ray", "job", "submit"]]
    assert len(submits) >= 4
    for words in submits:
        head = words[: words.index("--")]
        assert (
            option(head, "--working-dir") == "." and option(head, "--address") == "http://127.0.0.1:8265"
        ), words


def test_results_go_to_s3_and_trial_drivers_to_the_head():
    (tune,) = job_commands("tune.py")
    (ensemble,) = job_commands("ensemble.py")
    storage = option(tune, "--storage")
    assert storage.startswith("s3://")
    assert option(ensemble, "--experiment") == f"{storage}/{option(tune, '--name')}"
    assert option(tune, "--driver-resource") == DRIVER_RESOURCE
    assert DRIVER_RESOURCE in load_aws_config()["available_node_types"]["head"]["resources"]
    assert float(option(tune, "--gpus-per-trial")) == 1


@pytest.mark.parametrize("script", ["preprocess", "tune", "ensemble"])
def test_documented_job_arguments_parse_with_the_scripts_parsers(script):
    parser = job_parser(script)
    for args in job_commands(f"{script}.py"):
        parser.parse_args(args)  # SystemExit (exit code 2) on an unknown flag or a bad value
