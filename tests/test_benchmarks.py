"""The benchmarks run on the tiny project, and the pairs they time do the same work.

Their speed figures are not asserted here: those belong to `make bench`, on an idle machine.
What is asserted is what makes a ratio mean something: 2 featurize workers write the bytes 1
writes, and the bare training loop ends with the stage's weights, bit for bit.
"""

import json
from pathlib import Path

import pandas as pd
from conftest import REPO, run_python


def run_benchmark(name: str, *args: str, out: Path) -> dict:
    run_python([str(REPO / "benchmarks" / f"{name}.py"), *args, "--out", str(out)], REPO)
    return json.loads(out.read_text())


def test_featurize_benchmark_compares_the_same_files_and_workers_agree(tiny_pipeline, tmp_path):
    results = run_benchmark("featurize", "--project-dir", str(tiny_pipeline), "--rounds", "1", "--workers", "2",
                            out=tmp_path / "featurize.json")
    manifests = [pd.read_json(tiny_pipeline / f"data/manifests/{s}.jsonl", lines=True) for s in ("train", "valid", "test")]
    assert results["files"] == sum(len(m) for m in manifests)
    assert results["parallel_output_identical"] is True
    assert set(results["audio_seconds_per_second"]) == {"bare loop (soundfile.read + log-mel), 1 process",
                                                        "featurize stage, 1 worker", "featurize stage, 2 workers"}
    assert all(rate > 0 for rate in results["audio_seconds_per_second"].values())


def test_train_benchmark_bare_loop_ends_with_the_stages_weights(tiny_pipeline, tmp_path):
    results = run_benchmark("train", "--project-dir", str(tiny_pipeline), "--rounds", "1", "--utterances", "24",
                            "--valid-utterances", "4", "--num-threads", "1", out=tmp_path / "train.json")
    assert results["weights_identical_after_the_epoch"] is True
    assert results["frames"] > 0 and results["batches"] >= 1
    assert set(results["ratio_stage_to_bare"]) == {"0 loader workers", "2 loader workers"}
    assert all(share > 0 for share in results["data_loader_share_of_step_time"].values())  # workers: their start too


def test_dask_featurize_benchmark_compares_the_same_files_on_every_executor(tiny_pipeline, tmp_path):
    results = run_benchmark("dask_featurize", "--project-dir", str(tiny_pipeline), "--rounds", "1",
                            out=tmp_path / "dask_featurize.json")
    assert results["output_identical"] is True
    assert set(results["audio_seconds_per_second"]) == {"local, 1 worker(s)", "local, 2 worker(s)",
                                                        "dask, 1 worker(s)", "dask, 2 worker(s)"}
    assert results["ratio_to_local_1_worker"]["local, 1 worker(s)"] == 1.0
    assert set(results["cluster_start_seconds"]) == {"1 worker(s)", "2 worker(s)"}
