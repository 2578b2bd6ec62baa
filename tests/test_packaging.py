"""Set-up files agree: conda's environment.yml and Binder install what pyproject.toml declares; CI runs the README's commands."""
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _names(requirements):
    return {re.split(r"[<>=!~ \[]", r.strip().strip('"'), maxsplit=1)[0].lower() for r in requirements}


def test_environment_yml_lists_every_dependency():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = _names(project["dependencies"]) | _names(project["optional-dependencies"]["dev"])
    env_lines = [l.strip()[2:] for l in (ROOT / "environment.yml").read_text().splitlines() if l.strip().startswith("- ")]
    in_env = _names(l for l in env_lines if not l.startswith(("python", "pip", '"-e', "-e")))
    # kernel plumbing and tqdm come with jupyterlab/papermill in conda; everything the lessons import must be listed
    missing = declared - in_env - {"nbformat", "nbclient", "ipykernel", "tqdm", "numpy"}
    assert not missing, f"environment.yml lacks {sorted(missing)}"


def test_ci_runs_the_readme_commands():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
    commands = [l.strip() for b in blocks for l in b.splitlines() if l.strip() and not l.strip().startswith("#")]
    for command in ("python -m qlora_nb prepare", "python -m qlora_nb run", "pytest"):
        assert command in commands, f"README must show `{command}`"
        assert command in ci.splitlines(), f".ci/run must run `{command}` exactly as the README shows it"
    setup = next(c for c in commands if "pip install" in c)
    assert setup in ci, ".ci/run must install exactly as the README says"


def test_binder_prepares_the_embedded_model():
    post = ROOT / "binder" / "postBuild"
    assert post.stat().st_mode & 0o111, "postBuild must be executable"
    assert "python -m qlora_nb prepare" in post.read_text()
