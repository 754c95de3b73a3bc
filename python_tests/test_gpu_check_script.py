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
