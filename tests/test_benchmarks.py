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


def test_attention_benchmark_runs_all_methods():
    done = subprocess.run([sys.executable, "benchmarks/attention.py", "--lengths", "64", "128", "--repeat", "1",
                           "--heads", "1"], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "naive ms" in done.stdout and "sdpa MiB" in done.stdout
    assert "largest difference" in done.stdout and "(within 1e-5)" in done.stdout
    assert "x below naive" in done.stdout and "growth exponents" in done.stdout


def test_quantization_benchmark_runs_and_reports_every_goal():
    command = [sys.executable, "benchmarks/quantization.py", "--steps", "2", "--eval-batches", "1",
               "--eval-batch-size", "2", "--batch-size", "2"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "loss ratio" in done.stdout and "size ratio" in done.stdout and "gap recovered" in done.stdout
    assert "of 6 goals met" in done.stdout


def test_kv_cache_benchmark_asserts_identical_tokens_and_prints_ratios():
    done = subprocess.run([sys.executable, "benchmarks/kv_cache.py", "--tokens", "24", "--repeat", "1"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "identical tokens with and without the cache: all 24 of them" in done.stdout
    assert "x faster with the KV cache" in done.stdout and "tokens/s" in done.stdout
    assert "equal to the formula" in done.stdout


def test_lora_benchmark_runs_and_reports_every_goal():
    command = [sys.executable, "benchmarks/lora.py", "--steps", "2", "--eval-batches", "1", "--batch-size", "2"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "new-domain loss ratio" in done.stdout and "QLoRA's NF4" in done.stdout
    assert "of 3 goals met" in done.stdout and "falls under 1% of the parameters from width" in done.stdout
