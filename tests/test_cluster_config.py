"""``cluster.yaml`` passes Ray's own cluster-config checks and keeps the cluster safe; the IAM policies of
``deploy/iam`` are scoped; nodes install from the hashed lock file; the scaling guide's commands match the job
scripts.

The AWS config goes through what ``ray up`` runs before its first cloud call (``prepare_config`` then the
``ray-schema.json`` validation); the commented on-premises variant goes through the whole of ``ray up``'s
config bootstrap, which for ``provider: type: local`` needs no network. The launcher's AWS steps that would
call EC2 run against a stub (they need boto3, which the project's environment may lack: then they skip).
No test talks to AWS.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import tomllib
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from packaging.requirements import Requirement
from ray.autoscaler._private.commands import _bootstrap_config
from ray.autoscaler._private.util import prepare_config, validate_config

from tests.conftest import job_parser

REPO_ROOT = Path(__file__).resolve().parent.parent
CLUSTER_YAML = REPO_ROOT / "cluster.yaml"
GUIDE = REPO_ROOT / "docs" / "scaling_out.md"
LOCK = REPO_ROOT / "deploy" / "requirements.lock"
IAM = REPO_ROOT / "deploy" / "iam"
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


def node_configs(aws: dict) -> dict[str, dict]:
    return {name: t["node_config"] for name, t in aws["available_node_types"].items()}


def test_rsync_skips_what_rayignore_lists(config):
    """``ray up`` copied raw images to every node: only .gitignore was named, the data folders are in .rayignore."""
    assert {".gitignore", ".rayignore"} <= set(config["rsync_filter"])
    assert {"Blood_data/", "*.dcm", "shards/"} <= set((REPO_ROOT / ".rayignore").read_text().split())


# What EC2 accepts as an image id; anything else is rejected as InvalidAMIID.Malformed.
AMI_ID = re.compile(r"ami-[0-9a-f]{8}(?:[0-9a-f]{9})?")


def test_every_node_type_names_an_ami_the_user_must_fill_in(aws):
    """The launcher's default AMI has a driver older than CUDA 13.0 (torch 2.14.1) needs: no node may get it."""
    for name, node_config in node_configs(aws).items():
        image = node_config.get("ImageId", "")
        assert image.lower() not in ("", "latest_dlami"), f"{name}: the launcher would pick its default AMI"
        assert "REPLACE" in image and not AMI_ID.fullmatch(image), f"{name}: {image} is not the placeholder"
    header = CLUSTER_YAML.read_text().split("cluster_name:")[0]
    assert "580" in header and "580" in GUIDE.read_text()  # the driver requirement, spelled out


def test_ray_keeps_the_placeholder_ami_instead_of_its_default(aws):
    # The launcher's AWS module imports boto3.
    aws_config = pytest.importorskip("ray.autoscaler._private.aws.config", exc_type=ImportError)
    checked = copy.deepcopy(aws)
    aws_config._check_ami(checked)
    assert node_configs(checked) == node_configs(aws)
    assert not {c["ImageId"] for c in node_configs(aws).values()} & set(aws_config.DEFAULT_AMI.values())


def test_every_node_type_is_in_the_users_security_group(aws):
    """Without SecurityGroupIds on every node type the launcher creates a group with SSH open to the world."""
    groups = {name: tuple(c.get("SecurityGroupIds", ())) for name, c in node_configs(aws).items()}
    assert all(groups.values()), groups
    assert len(set(groups.values())) == 1, groups  # one group: the nodes reach each other
    assert "security_group" not in aws["provider"]  # nothing for the launcher to create


def test_launcher_stops_before_launching_while_the_group_is_a_placeholder(aws, monkeypatch):
    """The first EC2 step of ``ray up`` that reads the config's groups finds no ``sg-REPLACE-...`` and stops."""
    aws_config = pytest.importorskip("ray.autoscaler._private.aws.config", exc_type=ImportError)
    ec2 = type("StubEC2", (), {})()
    ec2.security_groups = type("Groups", (), {"filter": staticmethod(lambda **_: [])})()  # no such group
    monkeypatch.setattr(aws_config, "_resource", lambda *_: ec2)
    (group,) = {g for c in node_configs(aws).values() for g in c["SecurityGroupIds"]}
    assert "REPLACE" in group
    with pytest.raises(AssertionError):
        aws_config._get_vpc_id_of_sg([group], aws)


def test_every_disk_is_encrypted(aws):
    for name, node_config in node_configs(aws).items():
        disks = node_config["BlockDeviceMappings"]
        assert disks and all(d["Ebs"]["Encrypted"] is True for d in disks), name


def test_every_node_requires_imdsv2(aws):
    """A session token for the instance metadata: a forged request (SSRF) cannot read the role's credentials."""
    for name, node_config in node_configs(aws).items():
        options = node_config["MetadataOptions"]
        assert options["HttpTokens"] == "required", name
        assert options.get("HttpEndpoint", "enabled") == "enabled", name  # the autoscaler's own credentials
        assert options.get("HttpPutResponseHopLimit", 1) == 1, name  # docker runs --net=host: no extra hop


# ------------------------------------------------------------------------------------------ IAM


def policy(name: str) -> dict:
    return json.loads((IAM / f"{name}.json").read_text())


def statements(doc: dict) -> list[dict]:
    return [dict(s, Action=_as_list(s["Action"]), Resource=_as_list(s["Resource"])) for s in doc["Statement"]]


def _as_list(value) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def scope_problems(doc: dict, worker_role: str) -> list[str]:
    """What makes a policy broader than it should be: a wildcard action, a mutating action on every resource,
    PassRole on anything but the worker role."""
    problems = []
    for st in statements(doc):
        if st["Effect"] != "Allow":
            continue
        for action in st["Action"]:
            if action == "*" or action.endswith(":*"):
                problems.append(f"wildcard action {action}")
            if "*" in st["Resource"] and not re.fullmatch(r"ec2:Describe\w+", action):
                problems.append(f"{action} on every resource")
            if action.lower() == "iam:passrole" and st["Resource"] != [worker_role]:
                problems.append(f"PassRole on {st['Resource']}")
    return problems


def profile_name(node_config: dict) -> str:
    return node_config["IamInstanceProfile"]["Arn"].rsplit("/", 1)[1]


def test_each_node_type_has_a_dedicated_instance_profile(aws):
    """Not the launcher's default ray-autoscaler-v1 (EC2 and S3 full access) on the head that runs user code."""
    profiles = {name: profile_name(c) for name, c in node_configs(aws).items()}
    head = profiles.pop(aws["head_node_type"])
    assert head == "ich-ray-head" and set(profiles.values()) == {"ich-ray-worker"}, profiles
    arns = [c["IamInstanceProfile"]["Arn"] for c in node_configs(aws).values()]
    assert all(re.fullmatch(r"arn:aws:iam::\d{12}:instance-profile/[\w-]+", arn) for arn in arns), arns


@pytest.mark.parametrize("name", ["head-policy", "worker-policy", "ec2-trust-policy"])
def test_policy_documents_parse(name):
    doc = policy(name)
    assert doc["Version"] == "2012-10-17" and doc["Statement"]


def test_head_policy_is_scoped_to_this_cluster_one_bucket_and_the_worker_role(aws):
    account = aws["available_node_types"]["head"]["node_config"]["IamInstanceProfile"]["Arn"].split(":")[4]
    worker_role = f"arn:aws:iam::{account}:role/ich-ray-worker"
    doc = policy("head-policy")
    assert scope_problems(doc, worker_role) == []
    cluster_tag = {"ray-cluster-name": aws["cluster_name"]}
    for st in statements(doc):
        tags = {
            k.split("/", 1)[1]: v
            for k, v in st.get("Condition", {}).get("StringEquals", {}).items()
            if "Tag/" in k
        }
        if set(st["Action"]) & {"ec2:TerminateInstances", "ec2:StopInstances", "ec2:StartInstances"}:
            assert tags == cluster_tag, st["Sid"]  # only instances of this cluster
        if "ec2:RunInstances" in st["Action"] and any(":instance/" in r for r in st["Resource"]):
            assert tags == cluster_tag, st["Sid"]  # only instances that carry the cluster's tag
        if "ec2:CreateTags" in st["Action"]:
            assert tags == cluster_tag or st["Condition"]["StringEquals"] == {
                "ec2:CreateAction": "RunInstances"
            }
    buckets = {
        r.split(":::")[1].split("/")[0] for st in statements(doc) for r in st["Resource"] if ":s3:::" in r
    }
    assert buckets == {"YOUR-BUCKET"}


def test_worker_policy_reaches_one_bucket_prefix_and_nothing_else():
    doc = policy("worker-policy")
    assert scope_problems(doc, worker_role="none") == []
    for st in statements(doc):
        assert all(a.startswith("s3:") for a in st["Action"]), st["Sid"]
        for resource in st["Resource"]:
            if resource == "arn:aws:s3:::YOUR-BUCKET":
                assert st["Action"] == ["s3:ListBucket"]
                assert set(st["Condition"]["StringLike"]["s3:prefix"]) <= {"ich/", "ich/*"}
            else:
                assert resource == "arn:aws:s3:::YOUR-BUCKET/ich/*", resource


@pytest.mark.parametrize(
    "statement",
    [
        {"Effect": "Allow", "Action": "*", "Resource": "*"},
        {"Effect": "Allow", "Action": "s3:*", "Resource": "arn:aws:s3:::YOUR-BUCKET/*"},
        {"Effect": "Allow", "Action": "ec2:TerminateInstances", "Resource": "*"},
        {"Effect": "Allow", "Action": "iam:PassRole", "Resource": "*"},
        {"Effect": "Allow", "Action": "iam:PassRole", "Resource": "arn:aws:iam::123456789012:role/admin"},
    ],
    ids=["star-star", "service-wildcard", "terminate-anything", "passrole-any", "passrole-admin"],
)
def test_the_scope_check_catches_broad_statements(statement):
    worker_role = "arn:aws:iam::123456789012:role/ich-ray-worker"
    assert scope_problems({"Statement": [statement]}, worker_role)


def test_trust_policy_lets_only_ec2_assume_the_roles():
    (st,) = policy("ec2-trust-policy")["Statement"]
    assert st["Principal"] == {"Service": "ec2.amazonaws.com"} and st["Action"] == "sts:AssumeRole"


# ------------------------------------------------------------------------------------------ the lock file


def lock_entries() -> dict[str, tuple[Requirement, list[str]]]:
    """``{name: (requirement, sha256 hashes)}`` of ``deploy/requirements.lock``."""
    text = re.sub(r"\\\n\s*", " ", LOCK.read_text())
    entries = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip() if line.lstrip().startswith("#") else line.strip()
        if not line:
            continue
        spec, *options = line.split(" --hash=")
        requirement = Requirement(spec.strip())
        entries[requirement.name.lower().replace("_", "-")] = (requirement, [o.strip() for o in options])
    return entries


def test_lock_pins_every_package_with_a_sha256():
    entries = lock_entries()
    assert len(entries) > 50  # the whole closure, not just the top level
    for name, (requirement, hashes) in entries.items():
        (spec,) = requirement.specifier
        assert spec.operator == "==", name
        assert hashes and all(re.fullmatch(r"sha256:[0-9a-f]{64}", h) for h in hashes), name


def test_lock_covers_every_dependency_of_pyproject():
    """A dependency added to pyproject.toml and not to the lock would stop every node's setup."""
    entries = lock_entries()
    dependencies = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dependency in map(Requirement, dependencies):
        name = dependency.name.lower().replace("_", "-")
        assert name in entries, f"{name} is not in {LOCK.name}: run deploy/make_lock.py"
        requirement, _ = entries[name]
        version = next(iter(requirement.specifier)).version
        assert dependency.specifier.contains(version, prereleases=True), f"{name}=={version} vs {dependency}"
        assert dependency.extras <= requirement.extras, name
    pins = {n: next(iter(r.specifier)).version for n, (r, _) in entries.items()}
    assert (pins["torch"], pins["torchvision"], pins["ray"]) == ("2.14.1", "0.29.1", ray.__version__)
    assert {"pylibjpeg", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg", "pylibjpeg-rle", "boto3"} <= set(pins)


def test_setup_installs_the_lock_with_hashes_then_this_package_alone(config):
    repo_mount = next(remote for remote, local in config["file_mounts"].items() if local == ".")
    installs = [c for c in config["setup_commands"] if "pip install" in c]
    assert installs[0].split() == ["pip", "install", "--quiet", "--no-cache-dir", "--require-hashes", "-r",
                                   f"{repo_mount}/deploy/requirements.lock"]  # fmt: skip
    for command in installs[1:]:  # nothing else may fetch a dependency that the lock does not pin
        assert "--no-deps" in command.split(), command
    assert any(re.search(rf"pip install .*-e {re.escape(repo_mount)}$", c) for c in installs)
    # prepare_config merges setup_commands into both of these.
    role_commands = config["head_setup_commands"] + config["worker_setup_commands"]
    assert [c for c in role_commands if "pip install" in c and c not in installs] == []
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


PATH_OPTIONS = ("--input", "--labels", "--out", "--data", "--storage", "--experiment", "--test")


def test_every_job_path_is_in_the_bucket():
    """The AWS nodes share no file system: a local path would scatter shards over the nodes."""
    for script in ("preprocess", "tune", "ensemble"):
        for args in job_commands(f"{script}.py"):
            paths = [option(args, name) for name in PATH_OPTIONS if name in args]
            assert paths and all(p.startswith("s3://YOUR-BUCKET/ich/") for p in paths), (script, paths)


def test_guide_says_what_to_fill_in_and_what_protects_what():
    guide = GUIDE.read_text()
    for path in sorted(IAM.glob("*.json")):
        assert f"deploy/iam/{path.name}" in guide, f"{path.name} is not used in the guide"
    placeholders = ("ami-REPLACE", "sg-REPLACE", "123456789012", "YOUR-BUCKET", "deploy/requirements.lock")
    for placeholder in placeholders:
        assert placeholder in guide, placeholder
    assert re.search(r"`--space FILE` runs the code in that file", guide)
    for protected in ("The cluster token", "The head's role", "The workers' role", "The bucket", "IMDSv2"):
        assert f"**{protected}" in guide, protected


def test_guide_opens_no_port_to_the_internet():
    blocks = re.findall(r"```bash\n(.*?)```", GUIDE.read_text(), flags=re.S)
    commands = " ".join(block.replace("\\\n", " ") for block in blocks)
    ingress = re.findall(r"authorize-security-group-ingress[^\n]*", commands)
    assert len(ingress) == 2  # members of the group, SSH from your address
    for rule in ingress:
        assert not any(cidr in rule for cidr in WORLD), rule
        assert not any(f"--port {port}" in rule for port in CONTROL_PORTS), rule
