"""Training with two CPU processes through ``accelerate launch``: different data, identical weights.

``accelerate launch --cpu --num_processes 2`` starts one process unless mpirun is set up
(accelerate issue #2741), so the processes are started by accelerate's torchrun launcher
(``--multi_gpu``), which on a machine without a GPU gives CPU processes on the gloo backend.
"""

import json
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

from test_training import TINY_VAE


@pytest.mark.slow
def test_two_processes_see_different_data_and_end_with_identical_weights(tmp_path):
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    if accelerate is None:
        pytest.skip("the accelerate launcher is not installed")
    flags = [f"--{k.replace('_', '-')}={','.join(map(str, v)) if isinstance(v, tuple) else v}"
             for k, v in TINY_VAE.items() if k != "batch_size"]
    out = tmp_path / "run"
    if torch.cuda.is_available():
        pytest.skip("the CPU multi-process launch is tested on machines without a GPU")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0", "-m", "sdkit.training", "vae", "--out", str(out), "--steps", "3",
           "--batch-size", "8", "--log-indices", "true", *flags]  # the recipe's twin batches: 4 per process
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "indices" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        rank0, rank1 = r["indices"]
        assert len(rank0) == len(rank1) == 2  # per process 2 drawings (one background, one colour pair)
        assert not set(rank0) & set(rank1)
    seen = [i for r in steps for row in r["indices"] for i in row]
    assert len(seen) == len(set(seen)) == 12  # no example twice
    digests = [r for r in log if "weights_digest" in r][-1]["weights_digest"]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert (out / "vae" / "diffusion_pytorch_model.safetensors").is_file()


def test_accelerate_cpu_launch_that_starts_one_process_warns(monkeypatch):
    """`accelerate launch --cpu --num_processes 2` runs one process without MPI: say so, don't hide it."""
    from sdkit.training.loop import make_accelerator

    for name in ("WORLD_SIZE", "LOCAL_RANK", "RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")  # the environment accelerate's simple launcher sets
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    with pytest.warns(UserWarning, match="--multi_gpu --num_processes N"):
        accelerator = make_accelerator()
    assert accelerator.num_processes == 1
    monkeypatch.delenv("MASTER_ADDR")  # a plain single-process --cpu launch: nothing to warn about
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_accelerator()
