"""The README's command blocks that run on a CPU, run as written (in a shortened form) in a copy
of the repository, so a recipe cannot break silently. Blocks that need a cluster, data the user
brings (``lists/...``, ``tok.json``) or placeholders (``[flags]``) are listed and skipped."""
import os
import re
import shutil
import subprocess

import pytest

from conftest import REPO, _env

# Shortening: the same commands with fewer iterations (whole runs stay minutes on 2 cores).
SHORTER = [
    (r"TRAIN_ITERS=300\b", "TRAIN_ITERS=20"),
    (r"TRAIN_ITERS=1300\b", "TRAIN_ITERS=60"),
    (r"--iters 200\b", "--iters 10"),
    (r"global_step1000_universal", "global_step40_universal"),
]
SHORT_ENV = "TRAIN_ITERS=40 EVAL_INTERVAL=20 SAVE_INTERVAL=20 LOG_INTERVAL=20 EVAL_ITERS=2"


def readme_blocks(section: str):
    """The ```bash blocks of a README section (up to the next ## heading)."""
    text = open(os.path.join(REPO, "README.md")).read()
    start = text.index(f"## {section}")
    end = text.find("\n## ", start + 3)
    return re.findall(r"```bash\n(.*?)```", text[start:end if end > 0 else None], re.S)


def shorten(script: str) -> str:
    for pattern, replacement in SHORTER:
        script = re.sub(pattern, replacement, script)
    # a launch without its own length trains the (shortened) demo length
    lines = []
    for line in script.splitlines():
        if "bash train_alcf.sh" in line and "TRAIN_ITERS=" not in line and not line.lstrip().startswith("#"):
            line = line.replace("env $CPT ", "env $CPT " + SHORT_ENV + " ") if "env $CPT" in line else \
                SHORT_ENV + " " + line
        lines.append(line)
    return "\n".join(lines)


@pytest.mark.slow
def test_the_continual_pretraining_recipes_run_as_written(tmp_path):
    copy = tmp_path / "repo"
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.split()
    for name in tracked:
        os.makedirs(copy / os.path.dirname(name), exist_ok=True)
        shutil.copy2(os.path.join(REPO, name), copy / name)
    os.symlink(os.path.join(REPO, ".venv"), copy / ".venv")  # the environment the tests run in
    blocks = readme_blocks("Continual pretraining (CPT)")
    assert len(blocks) == 3  # prepare, (a) re-warm and replay, (b) constant LR
    # the section starts "after bash train_alcf.sh has set up .venv and the demo corpus"
    prepare = ".venv/bin/python -c 'from megatron_ext.launcher.demo import prepare; prepare(\"data/demo\")'"
    script = "set -euo pipefail\n" + prepare + "\n" + "\n".join(shorten(b) for b in blocks)
    env = _env()
    env.pop("PYTHONPATH", None)  # the copy runs its own checkout through the activated environment
    proc = subprocess.run(["bash", "-c", script], cwd=copy, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "skipped" in proc.stderr  # docs/ holds files that are not text: listed, not fatal
    assert (copy / "checkpoints" / "demo-cpt" / "global_step20").is_dir()
    assert (copy / "checkpoints" / "demo-constant" / "global_step60").is_dir()
    assert "--lr-cooldown-from-checkpoint 10" in proc.stdout  # the cooldown command it printed
