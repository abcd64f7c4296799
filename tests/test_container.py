"""The container contract, checked without Docker, and the packaging files checked statically.

``python inference.py`` with no argument runs in a sandbox built like the Grand Challenge
container: its own mount and network namespaces (``unshare --mount --net``), a fresh root on
tmpfs that mirrors the host's top-level folders, the repository at ``/opt/app`` (read-only), the
input folder bound read-only on ``/input``, a writable ``/output``, an empty ``/tmp``, no
network (only a loopback that is down), and, when the tests run as root, the unprivileged user
1001 as in the image. Where namespaces or mounts are not permitted the tests skip with the
reason. The scripts under ``scripts/`` are run against a fake ``docker`` that executes
``docker run`` in the same sandbox.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import REPO, linter, make_tiny_ensemble, write_fmc_tif

GC_INPUT = "images/fluorescence-lightsheet-3D-microscopy"
GC_OUTPUT = "images/fused-fluorescence-lightsheet-3D-microscopy"
CONTAINER_UID = 1001
SCRIPTS = ["docker_build.sh", "docker_test.sh", "docker_export.sh", "container_check.sh", "make_cpu_base.sh"]

# --------------------------------------------------------------------------- the sandbox

SETUP = r'''
import json, os, subprocess, sys

spec = json.loads(sys.argv[1])
root = spec["root"]


def mount(*args):
    subprocess.run(["mount", *args], check=True)


def mirror(src, dst):
    """dst shows src: a symlink is copied, a folder or a file is bind-mounted."""
    if os.path.islink(src):
        os.symlink(os.readlink(src), dst)
    elif os.path.isdir(src):
        os.mkdir(dst)
        mount("--rbind", src, dst)
    elif os.path.isfile(src):
        open(dst, "w").close()
        mount("--bind", src, dst)


mount("--make-rprivate", "/")
mount("-t", "tmpfs", "-o", "mode=0755", "fusecare-sandbox", root)
built = set(spec["built"])  # top-level folders made on the tmpfs instead of mirrored
for name in sorted(os.listdir("/")):
    src, dst = "/" + name, os.path.join(root, name)
    if name not in built:
        mirror(src, dst)
for name in sorted(built):
    dst = os.path.join(root, name)
    os.mkdir(dst)
    os.chmod(dst, 0o755)
    if name in spec["tmpfs"]:
        mount("-t", "tmpfs", "-o", "mode=1777", "fusecare-" + name, dst)
    elif name in spec["mirror_children"] and os.path.isdir("/" + name):
        for child in sorted(os.listdir("/" + name)):
            if "/" + name + "/" + child not in spec["bind_targets"]:
                mirror(os.path.join("/", name, child), os.path.join(dst, child))
for src, target, read_only in spec["binds"]:
    dst = root + target
    if os.path.isdir(src):
        os.makedirs(dst, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        open(dst, "w").close()
    mount("--bind", src, dst)
    if read_only:
        mount("-o", "remount,bind,ro", dst)
os.chroot(root)
os.chdir(spec["cwd"])
if spec["uid"] is not None:
    os.setgroups([])
    os.setgid(spec["uid"])
    os.setuid(spec["uid"])
os.umask(0o022)
os.execvpe(spec["argv"][0], spec["argv"], spec["env"])
'''


def _top(path: str) -> str:
    return Path(path).parts[1]


def sandbox_command(argv: list[str], binds: list[tuple[str, str, bool]], *, root: Path,
                    cwd: str = "/", env: dict[str, str] | None = None) -> list[str]:
    """The host command that runs ``argv`` in the sandbox (see the module docstring).

    ``binds`` are (host path, sandbox path, read-only); the Python running the tests, its
    virtual environment and the repository (at /opt/app, read-only) are added.
    """
    as_root = os.geteuid() == 0
    needed = {str(Path(sys.base_prefix).resolve()), sys.prefix, str(REPO)}
    binds = [*binds, (str(REPO), "/opt/app", True)]
    built = {"tmp", "opt"} | {_top(target) for _, target, _ in binds}
    if not os.access("/root", os.X_OK) or (as_root and os.stat("/root").st_mode & 0o001 == 0):
        built.add("root")  # root's home is closed to user 1001; open only what is needed
    for path in sorted(needed):
        if _top(path) in built:
            binds.append((path, path, True))
    binds.sort(key=lambda bind: len(Path(bind[1]).parts))
    spec = {
        "root": str(root), "built": sorted(built), "tmpfs": ["tmp"],
        "mirror_children": ["opt"], "bind_targets": [target for _, target, _ in binds],
        "binds": binds, "cwd": cwd, "argv": argv, "uid": CONTAINER_UID if as_root else None,
        "env": {
            "PATH": f"{Path(sys.executable).parent}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": "/tmp", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1",
            **(env or {}),
        },
    }
    root.mkdir(parents=True, exist_ok=True)
    unshare = ["unshare", "--mount", "--net"] if as_root else [
        "unshare", "--user", "--map-root-user", "--mount", "--net"]
    return [*unshare, sys.executable, "-c", SETUP, json.dumps(spec)]


def run_sandboxed(argv: list[str], binds: list[tuple[str, str, bool]], *, root: Path, cwd: str = "/",
                  env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(sandbox_command(argv, binds, root=root, cwd=cwd, env=env),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory) -> None:
    """Skip (with the reason) where a private mount and network namespace cannot be had."""
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        pytest.skip("unshare/mount not installed")
    tmp = tmp_path_factory.mktemp("probe")
    (tmp / "in").mkdir()
    try:
        result = run_sandboxed(["python", "-c", "print('sandbox ok')"], [(str(tmp / "in"), "/input", True)],
                               root=tmp / "root", timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot start a sandbox: {exc}")
    if result.returncode != 0 or "sandbox ok" not in result.stdout:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"namespaces or mounts not permitted here ({last})")


# --------------------------------------------------------------------------- the contract run

PROBE = r'''
import errno, fcntl, json, os, socket, struct
report = {"uid": os.getuid(), "interfaces": sorted(name for _, name in socket.if_nameindex())}
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
    flags = fcntl.ioctl(sock.fileno(), 0x8913, struct.pack("16sH", b"lo", 0))  # SIOCGIFFLAGS
report["lo_up"] = bool(struct.unpack("16sH", flags[:18])[1] & 1)
try:
    socket.create_connection(("192.0.2.1", 80), timeout=1).close()  # TEST-NET-1, RFC 5737
    report["connect"] = "connected"
except OSError as exc:
    report["connect"] = errno.errorcode.get(exc.errno, str(exc))
try:
    open("/input/written-by-the-container", "w").close()
    report["input_write"] = "written"
except OSError as exc:
    report["input_write"] = errno.errorcode.get(exc.errno, str(exc))
mounts = {line.split()[4]: line.split()[5].split(",") for line in open("/proc/self/mountinfo")}
report["input_options"] = mounts.get("/input", [])
report["output_options"] = mounts.get("/output", [])
report["tmp"] = sorted(os.listdir("/tmp"))
report["cwd"] = os.getcwd()
print(json.dumps(report))
'''


@pytest.fixture(scope="module")
def contract(sandbox, tmp_path_factory):
    """Two cases in /input, tiny weights via FUSECARE_WEIGHTS; a probe, then inference.py."""
    tmp = tmp_path_factory.mktemp("contract")
    weights = tmp / "weights"
    for channel in ("nucleus", "membrane"):
        make_tiny_ensemble(weights, channel)
    inp, out = tmp / "in", tmp / "out"
    rng = np.random.default_rng(5)
    cases = {
        "image_3_nucleus_angle.tif": rng.integers(100, 3000, (12, 48, 40), dtype=np.uint16),
        "image_4_membrane_angle.tiff": rng.integers(100, 3000, (8, 32, 64), dtype=np.uint16),
    }
    for name, data in cases.items():
        write_fmc_tif(inp / GC_INPUT / name, data, channel="nucleus" if "nucleus" in name else "membrane")
    out.mkdir()
    out.chmod(0o777)  # Grand Challenge's /output is writable by the container's user
    for path in [inp, *inp.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    before = sorted(str(p.relative_to(inp)) for p in inp.rglob("*"))
    binds = [(str(inp), "/input", True), (str(out), "/output", False), (str(weights), "/weights", True)]
    env = {"FUSECARE_WEIGHTS": "/weights"}
    probe = run_sandboxed(["python", "-c", PROBE], binds, root=tmp / "root1", cwd="/opt/app", env=env)
    assert probe.returncode == 0, probe.stderr
    run = run_sandboxed(["python", "inference.py"], binds, root=tmp / "root2", cwd="/opt/app", env=env)
    return {"probe": json.loads(probe.stdout), "run": run, "cases": cases, "inp": inp, "out": out,
            "before": before}


def test_inference_without_arguments_restores_every_case(contract):
    run = contract["run"]
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr and "FALLBACK" not in run.stderr
    assert "/input/images/fluorescence-lightsheet-3D-microscopy" in run.stderr
    out = contract["out"] / GC_OUTPUT
    assert sorted(p.name for p in out.iterdir()) == sorted(contract["cases"])
    for name, data in contract["cases"].items():
        with tifffile.TiffFile(out / name) as tif:
            assert tif.series[0].shape == data.shape
            assert tif.series[0].dtype == np.uint16


def test_sandbox_has_no_network(contract):
    probe = contract["probe"]
    assert probe["interfaces"] == ["lo"]
    assert probe["lo_up"] is False
    assert probe["connect"] == "ENETUNREACH"


def test_input_is_read_only_and_nothing_is_written_into_it(contract):
    probe = contract["probe"]
    assert "ro" in probe["input_options"]
    assert "rw" in probe["output_options"]
    assert probe["input_write"] in ("EROFS", "EACCES")
    inp = contract["inp"]
    assert sorted(str(p.relative_to(inp)) for p in inp.rglob("*")) == contract["before"]


def test_runs_as_the_image_user_with_an_empty_tmp_in_opt_app(contract):
    probe = contract["probe"]
    if os.geteuid() == 0:
        assert probe["uid"] == CONTAINER_UID
    # empty but for the mount points of the test's own Python and repository when they live
    # under /tmp on the host (a fresh clone in /tmp, say): those must be reachable in the sandbox
    needed = {Path(sys.base_prefix).resolve(), Path(sys.prefix), REPO}
    assert probe["tmp"] == sorted({p.parts[2] for p in needed if p.parts[1] == "tmp"})
    assert probe["cwd"] == "/opt/app"


def test_outputs_are_readable_by_others(contract):
    for path in (contract["out"] / GC_OUTPUT).iterdir():
        assert path.stat().st_mode & 0o044 == 0o044


# --------------------------------------------------------------------------- the Dockerfile


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    logical, current = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if current and line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    if current:
        logical.append(current)
    return [(parts[0].upper(), parts[1] if len(parts) > 1 else "")
            for parts in (line.split(None, 1) for line in logical)]


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return dockerfile_instructions((REPO / "Dockerfile").read_text())


def _base_image(instructions: list[tuple[str, str]]) -> str:
    args = {}
    for kind, value in instructions:
        if kind == "ARG" and "=" in value:
            key, default = value.split("=", 1)
            args[key.strip()] = default.strip()
        if kind == "FROM":
            return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), value.split()[0])
    raise AssertionError("no FROM")


def test_dockerfile_bases_a_pytorch_cuda12_runtime_image(dockerfile):
    image = _base_image(dockerfile)
    assert re.fullmatch(r"pytorch/pytorch:2\.\d+\.\d+-cuda12\.\d+-cudnn\d+-runtime", image), image
    assert sum(kind == "FROM" for kind, _ in dockerfile) == 1


def test_dockerfile_runs_as_a_non_root_user(dockerfile):
    users = [value.split(":")[0] for kind, value in dockerfile if kind == "USER"]
    assert users and users[-1] not in ("root", "0")
    kinds = [kind for kind, _ in dockerfile]
    last_user = len(kinds) - 1 - kinds[::-1].index("USER")
    assert all(kind != "RUN" or "pip" not in value for kind, value in dockerfile[last_user:])
    assert kinds.index("ENTRYPOINT") > last_user


def test_dockerfile_workdir_copies_and_entrypoint(dockerfile):
    assert [value for kind, value in dockerfile if kind == "WORKDIR"][-1] == "/opt/app"
    copies = " ".join(value for kind, value in dockerfile if kind == "COPY")
    for source in ("fusecare/", "inference.py", "model_weights/"):
        assert re.search(rf"(^|\s){re.escape(source)}(\s|$)", copies), source
    [entrypoint] = [value for kind, value in dockerfile if kind == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["python", "inference.py"]
    assert not any(kind == "CMD" for kind, _ in dockerfile)


def test_dockerfile_sets_unbuffered_output(dockerfile):
    env = " ".join(value for kind, value in dockerfile if kind == "ENV")
    assert re.search(r"PYTHONUNBUFFERED=1", env)


def test_dockerfile_installs_requirements_without_torch(dockerfile):
    runs = [value for kind, value in dockerfile if kind == "RUN" and "pip install" in value]
    assert runs, "no pip install"
    for value in runs:
        assert not re.search(r"-r\s+\S*requirements\.txt(\s|;|$)", value), "requirements.txt installed as is"
        assert re.search(r"\s(-c|--constraint)\s", value), "the base image's torch is not held"
    [pattern] = re.findall(r"grep -vE '([^']+)'", " ".join(runs))
    kept = subprocess.run(["grep", "-vE", pattern, str(REPO / "requirements-image.txt")],
                          capture_output=True, text=True, check=True).stdout.splitlines()
    requirements = [line for line in (REPO / "requirements-image.txt").read_text().splitlines()
                    if line.strip() and not line.startswith("#")]
    assert not [line for line in kept if re.match(r"\s*torch\b(?![\w-])", line)]
    assert [line for line in requirements if line not in kept] == [
        line for line in requirements if re.match(r"\s*torch\s*([=<>!~;\[]|$)", line)]


def test_dockerignore_keeps_the_context_small_but_complete(dockerfile):
    rules = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert rules[0] == "*"  # everything out, then the COPY inputs back in
    allowed = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    sources = [word.rstrip("/") for kind, value in dockerfile if kind == "COPY"
               for word in value.split()[:-1] if not word.startswith("--")]
    assert sources and set(sources) <= allowed
    assert not allowed & {".venv", ".git", "tests", "samples", "out", "runs", "train"}


def test_dockerfile_passes_hadolint():
    result = subprocess.run([linter("hadolint"), str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------- the scripts


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_is_executable_and_parses(script):
    path = REPO / "scripts" / script
    assert path.stat().st_mode & 0o111 == 0o111
    assert path.read_text().startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in path.read_text()
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_prints_usage(script):
    result = subprocess.run([str(REPO / "scripts" / script), "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert result.stdout.startswith("usage:")


def test_scripts_pass_shellcheck():
    """Every shell script, the training one included (not only the container's ``SCRIPTS``)."""
    scripts = sorted((REPO / "scripts").glob("*.sh"))
    assert {s.name for s in scripts} >= set(SCRIPTS)
    result = subprocess.run([linter("shellcheck"), *map(str, scripts)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


FAKE_DOCKER = r'''#!{python}
"""A stand-in for the docker client: logs its arguments; `run` executes in the test sandbox."""
import json, os, subprocess, sys
sys.path.insert(0, {tests!r})
from test_container import sandbox_command

args = sys.argv[1:]
with open(os.environ["FAKE_DOCKER_LOG"], "a") as log:
    log.write(json.dumps(args) + "\n")
if args[:2] == ["image", "inspect"] or args[:1] in (["build"], ["info"]):
    sys.exit(0)
if args[:1] == ["save"]:
    sys.stdout.buffer.write(os.environ.get("FAKE_DOCKER_SAVE", "").encode())
    sys.exit(int(os.environ.get("FAKE_DOCKER_SAVE_STATUS", "0")))
assert args[0] == "run", args
binds, entrypoint, i = [], ["python", "inference.py"], 1
while args[i].startswith("-"):
    option = args[i]
    if option in ("--rm",):
        i += 1
        continue
    value = args[i + 1]
    if option == "-v":
        src, dst, *mode = value.split(":")
        binds.append((src, dst, mode == ["ro"]))
    elif option == "--entrypoint":
        entrypoint = [value]
    i += 2
command = [*entrypoint, *args[i + 1:]]
binds.append((os.environ["FAKE_DOCKER_WEIGHTS"], "/weights", True))
root = os.path.join(os.environ["FAKE_DOCKER_ROOTS"], str(len(os.listdir(os.environ["FAKE_DOCKER_ROOTS"]))))
sys.exit(subprocess.run(sandbox_command(command, binds, root=__import__("pathlib").Path(root), cwd="/opt/app",
                                        env={{"FUSECARE_WEIGHTS": "/weights"}})).returncode)
'''


@pytest.fixture
def fake_docker(tmp_path, monkeypatch) -> Path:
    """A ``docker`` first on PATH; returns the log of its invocations (one JSON list a line)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    docker = bin_dir / "docker"
    docker.write_text(FAKE_DOCKER.format(python=sys.executable, tests=str(Path(__file__).parent)))
    docker.chmod(0o755)
    log = tmp_path / "docker.log"
    (tmp_path / "roots").mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_DOCKER_LOG", str(log))
    monkeypatch.setenv("FAKE_DOCKER_ROOTS", str(tmp_path / "roots"))
    return log


def _calls(log: Path) -> list[list[str]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_docker_test_script_runs_the_image_like_the_organisers(sandbox, fake_docker, tmp_path,
                                                               monkeypatch):
    weights = tmp_path / "weights"
    for channel in ("nucleus", "membrane"):
        make_tiny_ensemble(weights, channel)
    monkeypatch.setenv("FAKE_DOCKER_WEIGHTS", str(weights))
    samples = tmp_path / "samples"
    rng = np.random.default_rng(8)
    write_fmc_tif(samples / "image_5_nucleus_angle.tif", rng.integers(0, 900, (8, 40, 48), dtype=np.uint16))
    write_fmc_tif(samples / "image_6_membrane_angle.tif", rng.integers(0, 900, (6, 32, 32), dtype=np.uint16),
                  channel="membrane")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    result = subprocess.run([str(REPO / "scripts" / "docker_test.sh"), "img:test", str(samples)],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "TMPDIR": str(scratch)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK       image_5_nucleus_angle.tif: input (8, 40, 48), output (8, 40, 48) uint16" in result.stdout
    assert "PASS: 0 problem(s)" in result.stdout
    runs = [call for call in _calls(fake_docker) if call[0] == "run"]
    main = next(call for call in runs if "--entrypoint" not in call)
    joined = " ".join(main)
    for option in ("--gpus all", "--network none", "--shm-size 2g"):
        assert option in joined
    assert any(arg.endswith(":/input:ro") for arg in main)
    assert main[-1] == "img:test"
    assert all("--network" in call for call in runs)
    assert list(scratch.iterdir()) == []  # its temporary in/out folders are removed


def test_docker_test_script_fails_when_an_output_is_missing(sandbox, fake_docker, tmp_path,
                                                            monkeypatch):
    monkeypatch.setenv("FAKE_DOCKER_WEIGHTS", str(tmp_path))
    samples = tmp_path / "samples"
    write_fmc_tif(samples / "ok.tif", np.arange(6 * 16 * 16, dtype=np.uint16).reshape(6, 16, 16))
    (samples / "broken.tif").write_bytes(b"")  # inference.py writes no output for it
    result = subprocess.run([str(REPO / "scripts" / "docker_test.sh"), "img:test", str(samples)],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "DOCKER_GPUS": ""})
    assert result.returncode != 0
    assert "MISSING  broken.tif" in result.stdout
    assert "FAIL: 1 problem(s)" in result.stdout
    main = next(call for call in _calls(fake_docker) if call[0] == "run")
    assert "--gpus" not in main  # DOCKER_GPUS= turns the GPU request off


def test_docker_build_script_builds_the_tag_from_the_repository(fake_docker):
    result = subprocess.run([str(REPO / "scripts" / "docker_build.sh"), "fusecare:test", "--pull"],
                            capture_output=True, text=True, cwd="/", env={**os.environ, "ALLOW_NO_WEIGHTS": "1"})
    assert result.returncode == 0, result.stderr
    builds = [call for call in _calls(fake_docker) if call[0] == "build"]
    assert builds == [["build", "--tag", "fusecare:test", "--pull", "."]]


def test_docker_build_script_refuses_an_image_without_weights(fake_docker, tmp_path):
    """Run on a copy of the script in a repository whose model_weights/ holds no ensemble."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    (repo / "model_weights").mkdir()
    (repo / "model_weights" / "README.md").write_text("no weights\n")
    script = repo / "scripts" / "docker_build.sh"
    shutil.copy2(REPO / "scripts" / "docker_build.sh", script)
    result = subprocess.run([str(script)], capture_output=True, text=True,
                            env={k: v for k, v in os.environ.items() if k != "ALLOW_NO_WEIGHTS"})
    assert result.returncode == 1
    assert "no model_weights" in result.stderr
    assert not [call for call in _calls(fake_docker) if call[0] == "build"]


def test_docker_export_script_writes_a_gzipped_docker_save(fake_docker, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_DOCKER_SAVE", "pretend image tar\n")
    result = subprocess.run([str(REPO / "scripts" / "docker_export.sh"), "fusecare:v1"], cwd=tmp_path,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert gzip.decompress((tmp_path / "fusecare-v1.tar.gz").read_bytes()) == b"pretend image tar\n"
    assert ["save", "fusecare:v1"] in _calls(fake_docker)
    assert sorted(p.name for p in tmp_path.glob("fusecare*")) == ["fusecare-v1.tar.gz"]


def test_docker_export_script_leaves_no_partial_archive_on_failure(fake_docker, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_DOCKER_SAVE", "half an ima")
    monkeypatch.setenv("FAKE_DOCKER_SAVE_STATUS", "1")
    result = subprocess.run([str(REPO / "scripts" / "docker_export.sh"), "fusecare:v1", "x.tar.gz"],
                            cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode != 0
    assert not list(tmp_path.glob("x.tar.gz*"))

