"""CONTRACT.md section 8 *rev 3* "Supply chain": bounded dependencies, every import declared, and the
hash-pinned locks that make run, CI (make test) and README's install use."""

import ast
import configparser
import importlib.metadata
import re
import sys

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.helpers import ROOT

FIRST_PARTY = {"dtmf_service", "plugins", "app", "tests", "bench"}


def declared(section="install_requires", extra=None):
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    text = config["options.extras_require"][extra] if extra else config["options"][section]
    lines = [line.split("#")[0].strip() for line in text.splitlines()]
    return [Requirement(line) for line in lines if line]


def locked(name):
    """{distribution: (version, hashes)} of a lock file."""
    pins = {}
    text = (ROOT / name).read_text().replace("\\\n", " ")
    for line in text.splitlines():
        line = line.split(" #")[0].strip()
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)((?:\s+--hash=sha256:[0-9a-f]{64})*)\s*", line)
        assert match, f"{name}: not a hash-pinned line: {line}"
        pins[canonicalize_name(match[1])] = (match[2], re.findall(r"sha256:[0-9a-f]{64}", match[3]))
    return pins


def test_runtime_dependencies_bounded_below_and_below_the_next_major():
    pins = locked("requirements.lock")
    for requirement in declared():
        specs = {spec.operator: Version(spec.version) for spec in requirement.specifier}
        assert ">=" in specs and "<" in specs, f"{requirement}: needs a lower and an upper bound"
        current = Version(pins[canonicalize_name(requirement.name)][0])
        assert specs["<"] == Version(str(current.major + 1)), f"{requirement}: the upper bound is the next major"
    gunicorn = next(r for r in declared() if r.name == "gunicorn")
    # Before 24, gunicorn answers nothing at all to a malformed chunk extension.
    assert not gunicorn.specifier.contains("23.9") and gunicorn.specifier.contains("24.0")


def third_party_imports():
    """Top-level modules imported by the shipped code (the service, its plugins, app.py, gunicorn.conf.py)."""
    files = [*ROOT.joinpath("dtmf_service").rglob("*.py"), *ROOT.joinpath("plugins").rglob("*.py")]
    files += [ROOT / "app.py", ROOT / "gunicorn.conf.py"]
    found = {}
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in FIRST_PARTY and top != "__future__":
                    found.setdefault(top, path.relative_to(ROOT))
    return found


def test_every_imported_third_party_package_is_declared():
    names = {canonicalize_name(r.name) for r in declared()}
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    for extra in config["options.extras_require"]:
        names |= {canonicalize_name(r.name) for r in declared(extra=extra)}
    distributions = importlib.metadata.packages_distributions()
    imports = third_party_imports()
    assert {"flask", "werkzeug", "urllib3", "gunicorn", "redis"} <= set(imports)
    for module, where in imports.items():
        providers = {canonicalize_name(d) for d in distributions.get(module, [module])}
        assert providers & names, f"{module} (imported by {where}) is not declared in setup.cfg"


@pytest.mark.parametrize(("lock", "extras"), [("requirements.lock", []), ("requirements-test.lock", ["test"])])
def test_lock_pins_every_declared_dependency_by_hash(lock, extras):
    pins = locked(lock)
    wanted = declared() + [r for extra in extras for r in declared(extra=extra)]
    for requirement in wanted:
        if requirement.marker and not requirement.marker.evaluate():
            continue
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{lock} does not pin {requirement.name}"
        version, _ = pins[name]
        assert requirement.specifier.contains(version, prereleases=True), f"{lock}: {name}=={version} vs {requirement}"
    assert all(hashes for _, hashes in pins.values()), f"{lock}: a pin without a hash"
    assert {"setuptools", "wheel"} <= set(pins)  # the build backend of `pip install --no-deps` is pinned too


def test_make_ci_and_readme_install_from_the_locks():
    makefile = (ROOT / "Makefile").read_text()
    run_stamp = re.search(r"^\$\(RUN_STAMP\): (.*)$", makefile, re.M)[1]
    test_stamp = re.search(r"^\$\(TEST_STAMP\): (.*)$", makefile, re.M)[1]
    assert "requirements.lock" in run_stamp and "requirements-test.lock" in test_stamp
    assert "--require-hashes -r requirements.lock" in makefile
    assert "--require-hashes -r requirements-test.lock" in makefile
    installs = [
        x for x in re.findall(r"pip install[^\n]*", makefile) if "--upgrade pip" not in x and "pip-tools" not in x
    ]
    assert all("--require-hashes" in line or "--no-deps" in line for line in installs), installs
    assert re.search(r"^make test$", (ROOT / ".ci" / "run").read_text(), re.M)
    readme = (ROOT / "README.md").read_text()
    assert "pip install --require-hashes -r requirements.lock" in readme
    assert re.search(r"pip install --no-deps[^\n]* -e \.", readme)
    assert not re.search(r"pip install \.(\s|$)", readme)
