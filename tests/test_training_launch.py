"""The training scripts under real launches: kill -9 and `--resume latest`, two gloo ranks through
`accelerate launch` (DDP, and FSDP2 with sharded checkpoints), and the refusal of a multi-process launch that runs as
one process.

These start Python subprocesses (each imports torch and tokenloom: seconds on an idle machine, tens of
seconds on a loaded one); the training itself is a few tiny steps.
"""

import json
import os
import runpy
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "scripts" / "train_generator.py")
TWO_RANKS = str(ROOT / "configs" / "accelerate" / "cpu_2proc.yaml")
FSDP_RANKS = str(ROOT / "configs" / "accelerate" / "fsdp_cpu.yaml")

# Runs the script's main() in this process after installing a global forward hook on generators: `delay`
# seconds per forward (so a kill lands midway) and a record of each forward's batch size and module.
WRAPPER = r'''
import json, os, runpy, sys, time
import torch
from tokenloom.generators.base import TokenGenerator
delay, record = float(sys.argv[1]), sys.argv[2]
seen = {"sizes": [], "module": None}
def hook(module, args):
    if isinstance(module, TokenGenerator):
        seen["sizes"].append(int(args[0].data.shape[0]))
        seen["module"] = module
        time.sleep(delay)
torch.nn.modules.module.register_module_forward_pre_hook(hook)
sys.argv = [sys.argv[3]] + sys.argv[4:]
runpy.run_path(sys.argv[0], run_name="__main__")
if record != "-":
    from accelerate import PartialState
    rank = PartialState().process_index
    torch.save({"sizes": seen["sizes"], "weights": seen["module"].state_dict()}, f"{record}-rank{rank}.pt")
'''


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    return env


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    """A tiny shapes recipe around a saved (untrained) tiny VQ tokenizer."""
    from tokenloom.tokenizers import build

    root = tmp_path_factory.mktemp("launch")
    torch.manual_seed(0)
    build("vq", image_size=16, ch=8, ch_mult=[1, 2, 2], num_res_blocks=1, z_channels=8, norm_groups=4,
          codebook_size=32, codebook_dim=4).save_pretrained(root / "tokenizer")
    cfg = {"tokenizer": {"path": str(root / "tokenizer")},
           "data": {"name": "single_shapes", "split": "train", "image_size": 16, "num_samples": 64, "seed": 0},
           "generator": {"name": "raster_ar", "width": 16, "depth": 1, "num_heads": 2, "multiple_of": 16,
                         "condition": "class", "num_classes": 21, "cond_dropout": 0.1},
           "train": {"max_steps": 8, "batch_size": 8, "lr": 0.01, "warmup_steps": 2, "log_every": 1, "seed": 0,
                     "threads": 1, "checkpoint_every": 2, "log_with": "none", "ema_decay": 0.9}}
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(cfg))
    wrapper = root / "wrapper.py"
    wrapper.write_text(WRAPPER)
    return {"root": root, "path": str(path), "wrapper": str(wrapper)}


def _weights(run: Path) -> dict:
    return load_file(next((run / "generator").glob("*.safetensors")))


def test_kill_9_midway_then_resume_latest_equals_an_uninterrupted_run(recipe, tmp_path):
    main = runpy.run_path(SCRIPT)["main"]
    main(["--config", recipe["path"], "--output-dir", str(tmp_path / "straight"), "--no-progress"])

    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, recipe["wrapper"], "0.4", "-", SCRIPT, "--config", recipe["path"],
                             "--output-dir", str(run), "--no-progress"], env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    target = run / "generator" / "checkpoints" / "checkpoint-00000004"
    deadline = time.time() + 600
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert target.exists(), proc.stderr.read().decode()[-3000:]
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "generator" / "train_log.json").exists(), "the run finished before it was killed"

    summary = main(["--config", recipe["path"], "--output-dir", str(run), "--resume", "latest", "--no-progress"])
    assert summary["generator_steps"] == 8
    log = json.loads((run / "generator" / "train_log.json").read_text())
    assert log["resumed_from"].endswith(("checkpoint-00000004", "checkpoint-00000006"))
    straight, resumed = _weights(tmp_path / "straight"), _weights(run)
    assert straight.keys() == resumed.keys()
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k


def test_two_gloo_ranks_split_the_batch_and_match_one_process(recipe, tmp_path):
    cfg = yaml.safe_load(Path(recipe["path"]).read_text())
    cfg["generator"]["cond_dropout"] = 0.0  # no randomness in the model: rank RNG streams cannot matter
    cfg["train"].update(checkpoint_every=None, ema_decay=None)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(cfg))
    two = tmp_path / "two"
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", TWO_RANKS,
                           recipe["wrapper"], "0", str(tmp_path / "seen"), SCRIPT, "--config", str(path),
                           "--output-dir", str(two), "--no-progress"], env=_env(), capture_output=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    ranks = [torch.load(tmp_path / f"seen-rank{r}.pt") for r in (0, 1)]
    assert ranks[0]["sizes"] == ranks[1]["sizes"] == [4] * 8  # global batch 8 = 2 ranks x 4
    for k, v in ranks[0]["weights"].items():
        assert torch.equal(v, ranks[1]["weights"][k]), k

    _assert_loss_curve_matches_one_process(path, two, tmp_path / "one", "DDP")


def _assert_loss_curve_matches_one_process(recipe_path: Path, run: Path, one: Path, what: str,
                                           tolerance: float = 1e-4) -> None:
    """Train ``recipe_path`` in this process (one process, the same global batch) into ``one`` and compare its
    per-step losses with the multi-rank ``run``'s: the same global batches, so only the order of float sums differs
    (the ranks average two half-batch gradients). ``tolerance``: the largest relative loss difference allowed."""
    main = runpy.run_path(SCRIPT)["main"]
    main(["--config", str(recipe_path), "--output-dir", str(one), "--no-progress"])
    single = json.loads((one / "generator" / "train_log.json").read_text())["history"]
    ranks = json.loads((run / "generator" / "train_log.json").read_text())["history"]
    steps = yaml.safe_load(recipe_path.read_text())["train"]["max_steps"]
    assert [h["step"] for h in single] == [h["step"] for h in ranks] == list(range(1, steps + 1))
    gap = max(abs(a["loss"] - b["loss"]) / b["loss"] for a, b in zip(ranks, single))
    print(f"{what} 2 ranks vs 1 process: largest relative loss difference over {steps} steps {gap:.2e}\n"
          f"  2 ranks:   {[round(h['loss'], 6) for h in ranks]}\n  1 process: {[round(h['loss'], 6) for h in single]}")
    assert gap < tolerance, (what, gap)


def test_fsdp_two_gloo_ranks_match_one_process_export_loads_and_resume_latest_is_exact(recipe, tmp_path):
    """FSDP2 on two CPU ranks (configs/accelerate/fsdp_cpu.yaml: one FSDP unit per TransformerBlock, sharded
    checkpoints through torch.distributed.checkpoint): the loss curve matches one process, the exported folder
    loads and holds the one-process weights, and `--resume latest` from a sharded checkpoint ends bit for bit
    where the uninterrupted FSDP run ended."""
    from tokenloom.generators import GENERATORS

    cfg = yaml.safe_load(Path(recipe["path"]).read_text())
    cfg["generator"]["cond_dropout"] = 0.0  # no randomness in the model: rank RNG streams cannot matter
    cfg["train"].update(checkpoint_every=4, ema_decay=None)  # EMA is refused under FSDP
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(cfg))
    two = tmp_path / "two"

    def launch(*extra):
        proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", FSDP_RANKS,
                               SCRIPT, "--config", str(path), "--output-dir", str(two), "--no-progress", *extra],
                              env=_env(), capture_output=True, timeout=900)
        assert proc.returncode == 0, proc.stderr.decode()[-3000:]

    launch()
    checkpoints = two / "generator" / "checkpoints"
    # really sharded (accelerate alone would have run DDP): one model and one optimiser shard per rank
    for part in ("pytorch_model_fsdp_0", "optimizer_0"):
        assert sorted(p.name for p in (checkpoints / "checkpoint-00000008" / part).glob("*.distcp")) == [
            "__0_0.distcp", "__1_0.distcp"], part
    _assert_loss_curve_matches_one_process(path, two, tmp_path / "one", "FSDP")

    exported = GENERATORS.load(str(two / "generator"))
    single = GENERATORS.load(str(tmp_path / "one" / "generator"))
    assert type(exported) is type(single)
    full, reference = _weights(two), _weights(tmp_path / "one")
    assert full.keys() == reference.keys() == exported.state_dict().keys()
    for k in full:
        assert full[k].shape == reference[k].shape, k
        torch.testing.assert_close(full[k], reference[k], rtol=1e-3, atol=1e-4, msg=k)

    shutil.rmtree(checkpoints / "checkpoint-00000008")  # as if the run had died between steps 4 and 8
    (two / "generator" / "train_log.json").unlink()
    launch("--resume", "latest")
    log = json.loads((two / "generator" / "train_log.json").read_text())
    assert log["resumed_from"].endswith("checkpoint-00000004") and log["steps"] == 8
    resumed = _weights(two)
    assert [k for k in full if not torch.equal(full[k], resumed[k])] == []


def test_a_two_process_launch_that_runs_as_one_process_refuses_to_start(recipe, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu",
                           SCRIPT, "--config", recipe["path"], "--output-dir", str(tmp_path / "x")],
                          env=_env(), capture_output=True, timeout=600)
    assert proc.returncode != 0
    err = proc.stderr.decode()
    assert "launched for 2 processes but this run has 1" in err, err[-3000:]
    assert not (tmp_path / "x").exists()


TOKENIZER_WORKER = r'''
import sys
import torch
from accelerate import PartialState
from tokenloom.data.shapes import ShapesDataset
from tokenloom.tokenizers import build
from tokenloom.training.tokenizer_trainer import TrainConfig, cache_images, train_tokenizer
torch.manual_seed(0)
tok = build("vq", image_size=16, ch=8, ch_mult=[1, 2], num_res_blocks=1, z_channels=8, norm_groups=4,
            codebook_size=32, codebook_dim=4, dead_code_threshold=0.5)
data = cache_images(ShapesDataset("train", image_size=16, num_samples=64), progress=False)
train_tokenizer(tok, data, TrainConfig(max_steps=6, batch_size=8, progress=False, log_with="none", threads=1))
torch.save(tok.state_dict(), f"{sys.argv[1]}-rank{PartialState().process_index}.pt")
'''


def test_two_ranks_keep_one_codebook_despite_dead_code_restarts(tmp_path):
    """VQ restarts replace codes from each rank's own batch, outside the gradient: the tokenizer trainer copies
    rank 0's weights and buffers to the others after every step, so the replicas cannot drift apart."""
    worker = tmp_path / "worker.py"
    worker.write_text(TOKENIZER_WORKER)
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", TWO_RANKS,
                           "--main_process_port", "29541", str(worker), str(tmp_path / "tok")], env=_env(),
                          capture_output=True, timeout=900)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    a, b = (torch.load(tmp_path / f"tok-rank{r}.pt") for r in (0, 1))
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
