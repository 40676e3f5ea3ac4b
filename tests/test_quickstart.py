"""The README's main job: the quickstart recipe on the embedded SmolLM2-135M, on CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


@pytest.mark.slow
def test_quickstart_learns_and_reports(tmp_path, embedded_model_dir):
    env = dict(os.environ, COLUMNS="120")
    cmd = [sys.executable, "-m", "mlxtune", "run", str(ROOT / "recipes" / "quickstart.toml"), "--backend", "torch",
           "--no-progress", "--set", f"output.dir={json.dumps(str(tmp_path))}"]
    out = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "quickstart"
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    base = next(e for e in events if e["event"] == "eval" and not e["adapter"])
    final = [e for e in events if e["event"] == "eval" and e["adapter"]][-1]
    train = [e for e in events if e["event"] == "train"]
    assert len(train) == 24
    # the task is learnable: clear drops on both masks, as in the users' reports
    assert final["loss"] < 0.8 * base["loss"], (base, final)
    assert final["loss_full"] < base["loss_full"]
    report = (run / "report.md").read_text()
    assert "| eval loss (response only) |" in report and "| perplexity (full text) |" in report
    assert "base vs fine-tuned" in out.stdout
    print(f"\nquickstart: base {base['loss']:.4f} -> {final['loss']:.4f} (response), "
          f"{base['loss_full']:.4f} -> {final['loss_full']:.4f} (full); "
          f"{train[-1]['elapsed']:.0f} s of training")
