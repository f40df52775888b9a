"""One import root: rewards/ and eval/ install as grpo.rewards and grpo.eval, never at top level."""

import subprocess
import sys
import zipfile
from pathlib import Path

import grpo.eval
import grpo.rewards
import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_editable_install_maps_the_top_level_folders_into_grpo():
    assert Path(grpo.rewards.__file__).parent == ROOT / "rewards"
    assert Path(grpo.eval.__file__).parent == ROOT / "eval"


def test_no_top_level_rewards_or_eval_package_is_installed():
    code = "import importlib.util as u, sys; sys.path.remove(''); print(u.find_spec('rewards'), u.find_spec('eval'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", check=True)
    assert out.stdout.strip() == "None None"


@pytest.mark.slow
def test_the_built_wheel_holds_only_the_grpo_root(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
    )
    [wheel] = tmp_path.glob("grpo-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    roots = {name.split("/")[0] for name in names if not name.startswith("grpo-")}
    assert roots == {"grpo"}
    assert "grpo/rewards/math.py" in names and "grpo/eval/__init__.py" in names
    # every subpackage of the source tree is listed in pyproject (a missing one imports fine from
    # the editable install and fails only once installed from the wheel)
    for init in (ROOT / "grpo").rglob("__init__.py"):
        assert init.relative_to(ROOT).as_posix() in names
