"""The benchmark scripts still run and still check what they claim (small settings; no timing asserted)."""

import subprocess
import sys

from conftest import ROOT


def test_bpe_benchmark_runs_and_its_trainers_agree():
    command = [sys.executable, "benchmarks/bpe_training.py", "--merges", "16", "--whole-text-merges", "2",
               "--vocab-sizes", "300"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "identical merges" in done.stdout and "x faster" in done.stdout
    assert "vocabulary 300: train" in done.stdout


def test_training_benchmark_runs_both_configurations():
    done = subprocess.run([sys.executable, "benchmarks/training.py", "--steps", "4"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "course default (chapter 05)" in done.stdout and "nanoGPT CPU configuration" in done.stdout
    assert "in the course's favour" in done.stdout and "tokens/s" in done.stdout
