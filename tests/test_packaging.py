"""Issue 24: the wheel installs beside a user's own Prefect project with `flows/`, `tasks/`, `deployments/`.

The wheel is built from this checkout (`python -m build --wheel`) and installed with pip into a fresh virtual
environment. Its dependencies are not downloaded again: the fresh environment sees this test environment's
installed third-party packages through a folder of symlinks (every entry of site-packages except this
project's own editable install), so the test is fast and works offline. Everything of ours it imports comes
from the installed wheel, from a directory whose own `flows`, `tasks` and `deployments` packages come
first on sys.path.
"""

# namespace_rename: skip-file  (this test imports the user's own `flows`, `tasks`, `deployments` on purpose)

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
OWN_NAMES = {"cleanlist", "cleanlist_prefect"}

pytestmark = pytest.mark.usefixtures("prefect_harness")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    # Built from a copy: setuptools writes build/ and *.egg-info into the tree it builds, and a checkout's
    # leftovers (or another build of it at the same time) once failed the build ("Is a directory").
    source = tmp_path_factory.mktemp("source") / "tree"
    leftovers = shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__", "results")
    shutil.copytree(REPO, source, symlinks=True, ignore=leftovers)
    result = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(out), str(source)],
        capture_output=True, text=True, timeout=300, cwd=source,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # Our own configuration warns about nothing (setuptools' "byte-compiling is disabled" follows
    # PYTHONDONTWRITEBYTECODE of the environment, not the project).
    ours = [
        line for line in (result.stdout + result.stderr).splitlines()
        if ("warn" in line.lower() or "deprecat" in line.lower()) and "byte-compiling is disabled" not in line
    ]  # fmt: skip
    assert ours == [], "\n".join(ours)
    (built,) = out.glob("cleanlist_prefect-*.whl")
    return built


@pytest.fixture(scope="module")
def fresh_python(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("fresh")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    # Third-party dependencies: symlinks to this environment's, without our editable install.
    deps = root / "deps"
    deps.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        name = entry.name
        if name.startswith(("cleanlist", "__editable__", "_cleanlist")) or name.endswith(".pth"):
            continue
        (deps / name).symlink_to(entry)
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout.strip()  # fmt: skip
    Path(site, "_test_dependencies.pth").write_text(f"{deps}\n", encoding="utf-8")
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
         "--no-index", str(wheel)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr[-3000:]
    yield python


@pytest.fixture
def user_project(tmp_path: Path) -> Path:
    """A Prefect project laid out the conventional way: its own flows/, tasks/ and deployments/."""
    project = tmp_path / "my-project"
    for package in ("flows", "tasks", "deployments"):
        (project / package).mkdir(parents=True)
        (project / package / "__init__.py").write_text(f'WHOSE = "user {package}"\n', encoding="utf-8")
    # The user's modules may even share our module names.
    (project / "flows" / "enrich_frame.py").write_text('WHOSE = "user flows.enrich_frame"\n', "utf-8")
    (project / "deployments" / "cli.py").write_text('WHOSE = "user deployments.cli"\n', encoding="utf-8")
    return project


def _env(**extra: str) -> dict[str, str]:
    from prefect.settings import PREFECT_API_URL

    # The user's project directory comes first on sys.path (`python -c`, console scripts run from it).
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONSAFEPATH", "VIRTUAL_ENV"}}
    env.update(PYTHONPATH=".", PREFECT_API_URL=str(PREFECT_API_URL.value()), **extra)
    return env


def test_the_wheel_claims_no_generic_top_level_name(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (top_level,) = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        declared = set(archive.read(top_level).decode().split())
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        entries = archive.read(entry_points).decode()
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        meta = archive.read(metadata).decode()
    assert declared == OWN_NAMES
    shipped = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith(".dist-info")}
    assert shipped == OWN_NAMES
    assert "cleanlist_prefect/flows/enrich_contacts.py" in names
    assert "cleanlist_prefect/deployments/data/sample-crm-export.csv" in names
    assert "cleanlist-enrich = cleanlist_prefect.deployments.cli:main" in entries
    assert "cleanlist = cleanlist_prefect.flows.credentials" in entries
    assert "License-Expression: Apache-2.0" in meta.splitlines()


def test_installed_wheel_enriches_a_frame_beside_the_users_own_packages(
    fresh_python: Path, user_project: Path, make_sandbox: Any, tmp_path: Path
) -> None:
    sandbox = make_sandbox(rate_limit=None)
    script = textwrap.dedent(
        """
        import json, sys
        import cleanlist_prefect
        cheap = not any(m.split(".")[0] in {"prefect", "pandas"} for m in sys.modules)
        import flows, tasks, deployments, flows.enrich_frame, deployments.cli
        import pandas as pd
        from cleanlist_prefect import EnrichedFrame, enrich_dataframe

        frame = pd.DataFrame({
            "First Name": ["Jane", "Omar", "Li", "Solo"],
            "Last Name": ["Doe", "Haddad", "Wei", ""],
            "Website": ["acme.co.uk", "globex.com", "", ""],
            "Email": ["", "", "li.wei@mail.initech.com", ""],
        })
        enriched = enrich_dataframe(frame, enrichment_type="partial")
        import cleanlist_prefect.flows.credentials as credentials
        print(json.dumps({
            "cheap_import": cheap,
            "ours": cleanlist_prefect.__file__,
            "credentials": credentials.__file__,
            "user": [flows.WHOSE, tasks.WHOSE, deployments.WHOSE, flows.enrich_frame.WHOSE,
                     deployments.cli.WHOSE],
            "is_frame": isinstance(enriched, EnrichedFrame),
            "rows": sorted([*map(int, enriched.output.index), *map(int, enriched.rejects.index)]),
            "status": enriched.summary.status,
        }))
        """
    )
    result = subprocess.run(
        [str(fresh_python), "-c", script],
        capture_output=True, text=True, timeout=240, cwd=user_project,
        env=_env(CLEANLIST_API_KEY=sandbox.api_key, CLEANLIST_BASE_URL=sandbox.base_url,
                 CLEANLIST_STORE_URL=f"sqlite:///{tmp_path / 'store.db'}"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    venv = fresh_python.parent.parent
    assert Path(report["ours"]).is_relative_to(venv), report["ours"]
    assert Path(report["credentials"]).is_relative_to(venv), report["credentials"]
    assert report["user"] == [
        "user flows", "user tasks", "user deployments", "user flows.enrich_frame", "user deployments.cli",
    ]  # fmt: skip
    assert report["cheap_import"] is True
    assert report["is_frame"] is True
    assert report["rows"] == [0, 1, 2, 3]  # every row back, in the output or the rejects
    assert report["status"] == "completed"


def test_installed_console_script_runs_the_demo_beside_the_users_own_packages(
    fresh_python: Path, user_project: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    result = subprocess.run(
        [str(fresh_python.parent / "cleanlist-enrich"), "demo", "--output-dir", str(out), "--json"],
        capture_output=True, text=True, timeout=240, cwd=user_project,
        env=_env(CLEANLIST_API_KEY="", HOME=str(tmp_path / "home")),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["status"] == "completed"
    assert summary["rows_read"] == 300
    assert (out / "enriched.csv").exists()


def test_installed_block_type_registers_through_the_collection_entry_point(
    fresh_python: Path, user_project: Path
) -> None:
    """Prefect imports `prefect.collections` entry points at start-up: the block class is the wheel's."""
    script = textwrap.dedent(
        """
        import json
        from prefect.plugins import load_prefect_collections
        loaded = load_prefect_collections()
        from prefect.blocks.core import Block
        cls = Block.get_block_class_from_key("cleanlist-credentials")
        print(json.dumps({"loaded": sorted(loaded), "module": cls.__module__,
                          "file": __import__(cls.__module__, fromlist=["x"]).__file__}))
        """
    )
    result = subprocess.run(
        [str(fresh_python), "-c", script], capture_output=True, text=True, timeout=120, cwd=user_project,
        env=_env(),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert "cleanlist" in report["loaded"]
    assert report["module"] == "cleanlist_prefect.flows.credentials"
    assert Path(report["file"]).is_relative_to(fresh_python.parent.parent)


def test_flows_loaded_by_file_path_share_the_namespaced_modules() -> None:
    """Workers load prefect.yaml entrypoints by file path (a module named after the file). Only that
    entrypoint module gets a second copy; everything it imports (the credentials block type above all) is
    the single `cleanlist_prefect.*` module, so no block class or task is defined twice."""
    import yaml

    config = yaml.safe_load((REPO / "prefect.yaml").read_text(encoding="utf-8"))
    entrypoints = sorted({d["entrypoint"] for d in config["deployments"]})
    script = textwrap.dedent(
        """
        import collections, json, os, sys
        from prefect.flows import load_flow_from_entrypoint
        flows = {e: load_flow_from_entrypoint(e).name for e in sys.argv[1:]}
        import cleanlist_prefect.flows.enrich_contacts, cleanlist_prefect.flows.backfill_contacts
        from prefect.blocks.core import Block
        from cleanlist_prefect.flows.credentials import CleanlistCredentials
        by_file = collections.defaultdict(list)
        for name, module in list(sys.modules.items()):
            path = getattr(module, "__file__", None)
            real = os.path.realpath(path) if path else ""
            if real.startswith(os.getcwd() + os.sep) and not os.path.relpath(real).startswith("."):
                by_file[os.path.relpath(real)].append(name)
        print(json.dumps({
            "twice": {f: sorted(n) for f, n in by_file.items() if len(n) > 1},
            "flows": flows,
            "block": Block.get_block_class_from_key("cleanlist-credentials") is CleanlistCredentials,
            "generic": sorted(m for m in sys.modules if m.split(".")[0] in {"flows", "tasks", "deployments"}),
        }))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script, *entrypoints], capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    entry_files = {e.split(":", 1)[0] for e in entrypoints}
    assert set(report["twice"]) <= entry_files, report["twice"]
    for names in report["twice"].values():
        assert len(names) == 2 and sum(n.startswith("cleanlist_prefect.") for n in names) == 1, names
    assert report["block"] is True
    assert report["generic"] == []
    assert sorted(report["flows"].values()) == ["backfill-contacts", "enrich-contacts"]
