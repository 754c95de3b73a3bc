"""scripts/gpu_check.sh's stage selection: checked here, since the script itself only runs on a GPU."""

import re
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"


def test_known_stages_are_the_stages_the_script_runs():
    text = SCRIPT.read_text()
    known = re.search(r'known_stages=" ([^"]+) "', text).group(1).split()
    run = re.findall(r"^stage (\w+) ", text, flags=re.M)
    assert known == run


def test_unknown_stage_is_refused_before_anything_runs(tmp_path):
    proc = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "GPU_CHECK_STAGES": "ops,hvps"}, cwd=SCRIPT.parents[1],
                          timeout=60)
    assert proc.returncode == 2
    assert "GPU_CHECK_STAGES: unknown stage 'hvps'" in proc.stderr
    assert " hvp " in proc.stderr  # the valid choices are listed


def test_issue17_names_its_stages_and_fits_in_eight_minutes(tmp_path):
    """GPU_CHECK_STAGES=issue17 expands to its stages (an unknown one beside it is still refused by
    name), and their caps plus the build's measured 21 s stay within the 480 s budget it defaults to."""
    text = SCRIPT.read_text()
    group = re.search(r'^issue17="([^"]+)"', text, flags=re.M).group(1).split(",")
    caps = {name: int(cap) for name, cap in re.findall(r"^stage (\w+) (\d+) ", text, flags=re.M)}
    assert group == ["tests_issue17", "profile", "meta_step_issue17", "meta_step_20w5s_issue17", "compile_probe"]
    assert sum(caps[name] for name in group) + 21 <= 480
    assert "default_budget=480" in text
    proc = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "GPU_CHECK_STAGES": "issue17,profiles"},
                          cwd=SCRIPT.parents[1], timeout=60)
    assert proc.returncode == 2 and "unknown stage 'profiles'" in proc.stderr
    assert "tests_issue17" not in proc.stderr.split("unknown stage")[1].split(";")[0]
