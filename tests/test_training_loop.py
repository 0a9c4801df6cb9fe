"""The shared Accelerate loop (tokenloom.training.loop): resumption, atomic checkpoints, EMA, accumulation,
mixed precision, sample grids and trackers, on tiny generators and tokenizers (a few seconds each)."""

import json
import os

import pytest
import torch
from accelerate.state import AcceleratorState

from tokenloom import generators
from tokenloom.tokens import Grid, TokenSpec
from tokenloom.training import checkpoint as ckpt
from tokenloom.training.generator_trainer import GeneratorTrainConfig, train_generator
from tokenloom.training.tokenizer_trainer import TrainConfig, train_tokenizer

SPEC = TokenSpec(kind="index", vocab_size=16, layout=Grid(2, 3))


def tiny_generator(seed: int = 0, **kw):
    torch.manual_seed(seed)
    return generators.build("raster_ar", token_spec=SPEC.to_dict(), **{
        "width": 16, "depth": 1, "num_heads": 2, "multiple_of": 16, "num_classes": 4, "cond_dropout": 0.1, **kw})


def tiny_data(n: int = 48):
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 4, (n,), generator=g)
    tokens = (labels[:, None, None] * 3 + torch.randint(0, 4, (n, 6, 1), generator=g)) % 16
    return torch.utils.data.TensorDataset(tokens, labels)


def config(tmp_path=None, **kw) -> GeneratorTrainConfig:
    base = dict(max_steps=8, batch_size=8, lr=1e-2, warmup_steps=2, log_every=1, progress=False, threads=1,
                log_with="none", output_dir=None if tmp_path is None else str(tmp_path))
    return GeneratorTrainConfig(**{**base, **kw})


def weights(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_equal_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(autouse=True)
def _fresh_accelerator_state():
    """Mixed precision is process-global in accelerate: reset it around every test (test-only use)."""
    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    straight = tiny_generator()
    train_generator(straight, tiny_data(), config(ema_decay=0.9))
    # interrupted: the same run crashes in step 5, after the checkpoint of step 3; then resume from 'latest'
    first, out = tiny_generator(), tmp_path / "run"
    cut = config(out, checkpoint_every=3, ema_decay=0.9)
    calls = []

    def crash(module, args):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt("simulated crash")

    first.register_forward_pre_hook(crash)
    with pytest.raises(KeyboardInterrupt):
        train_generator(first, tiny_data(), cut)
    assert [s for s, _ in ckpt.list_checkpoints(str(out / "checkpoints"))] == [3]
    resumed = tiny_generator(seed=123)  # different init: everything must come from the checkpoint
    result = train_generator(resumed, tiny_data(), GeneratorTrainConfig(**{**cut.__dict__, "resume": "latest"}))
    assert result.steps == 8
    assert_equal_weights(weights(straight), weights(resumed))
    assert [h["step"] for h in result.history] == list(range(1, 9))


def test_half_written_checkpoints_are_never_resumed(tmp_path, monkeypatch):
    from accelerate import Accelerator

    model = tiny_generator()
    folder = tmp_path / "run" / "checkpoints"
    train_generator(model, tiny_data(), config(tmp_path / "run", max_steps=2, checkpoint_every=2))
    real = Accelerator.save_state

    def crash(self, output_dir=None, **kw):
        real(self, output_dir, **kw)
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(Accelerator, "save_state", crash)
    with pytest.raises(KeyboardInterrupt):
        train_generator(tiny_generator(), tiny_data(), config(tmp_path / "run", max_steps=4, checkpoint_every=2,
                                                              resume="latest"))
    names = sorted(os.listdir(folder))
    assert names == [".tmp-checkpoint-00000004", "checkpoint-00000002"], names
    assert ckpt.latest_checkpoint(str(folder)).endswith("checkpoint-00000002")
    monkeypatch.setattr(Accelerator, "save_state", real)
    result = train_generator(tiny_generator(), tiny_data(), config(tmp_path / "run", max_steps=4, checkpoint_every=2,
                                                                   resume="latest"))
    assert result.steps == 4 and sorted(os.listdir(folder)) == ["checkpoint-00000002", "checkpoint-00000004"]


def test_resuming_with_a_different_config_names_the_keys(tmp_path):
    train_generator(tiny_generator(), tiny_data(), config(tmp_path, max_steps=2, checkpoint_every=2))
    with pytest.raises(ValueError, match=r"config\.lr: checkpoint 0\.01 vs now 0\.02"):
        train_generator(tiny_generator(), tiny_data(), config(tmp_path, max_steps=4, lr=2e-2, resume="latest"))
    with pytest.raises(ValueError, match=r"model\.width: checkpoint 16 vs now 32"):
        train_generator(tiny_generator(width=32), tiny_data(), config(tmp_path, max_steps=4, resume="latest"))
    with pytest.raises(ValueError, match="neither 'latest' nor a checkpoint folder"):
        train_generator(tiny_generator(), tiny_data(), config(tmp_path, resume=str(tmp_path / "nope")))


def test_ema_weights_are_exported_and_raw_ones_kept_beside_them(tmp_path):
    model = tiny_generator()
    train_generator(model, tiny_data(), config(tmp_path, max_steps=5, ema_decay=0.5))
    exported = type(model).from_pretrained(tmp_path)
    raw = type(model).from_pretrained(tmp_path / "non_ema")
    assert_equal_weights(weights(exported), weights(model))  # the in-memory model holds the EMA weights too
    assert any(not torch.equal(a, b) for a, b in zip(weights(exported).values(), weights(raw).values()))
    log = json.loads((tmp_path / "train_log.json").read_text())
    assert log["steps"] == 5


def test_gradient_accumulation_matches_one_big_batch():
    """Without dropout, 2 micro-batches of 4 = one batch of 8 (up to float summation order)."""
    runs = []
    for accum in (1, 2):
        model = tiny_generator(cond_dropout=0.0)
        result = train_generator(model, tiny_data(), config(grad_accum_steps=accum, grad_clip=None))
        runs.append(([h["loss"] for h in result.history], weights(model)))
    (la, wa), (lb, wb) = runs
    assert la == pytest.approx(lb, rel=1e-5, abs=1e-6)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)


def test_bf16_mixed_precision_trains_on_cpu():
    model = tiny_generator(cond_dropout=0.0)
    result = train_generator(model, tiny_data(), config(max_steps=30, mixed_precision="bf16"))
    assert result.history[-1]["loss"] < 0.7 * result.history[0]["loss"]
    assert next(model.parameters()).dtype == torch.float32
    with pytest.raises(ValueError, match="mixed_precision must be"):
        config(mixed_precision="fp8")


def test_sample_grids_tensorboard_logs_and_the_batch_split(tmp_path):
    from tokenloom.data.shapes import ShapesDataset
    from tokenloom.tokenizers import build
    from tokenloom.training.tokenizer_trainer import cache_images

    torch.manual_seed(0)
    tok = build("vq", image_size=16, ch=8, ch_mult=[1, 2], num_res_blocks=1, z_channels=8, norm_groups=4,
                codebook_size=32, codebook_dim=4)
    data = cache_images(ShapesDataset("train", image_size=16, num_samples=16), progress=False)
    cfg = TrainConfig(max_steps=4, batch_size=4, sample_every=2, log_every=2, progress=False, threads=1,
                      output_dir=str(tmp_path), log_with="auto")
    train_tokenizer(tok, data, cfg)
    assert sorted(os.listdir(tmp_path / "samples")) == ["step-00000002.png", "step-00000004.png"]
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return
    assert any(f.startswith("events.out.tfevents") for _, _, fs in os.walk(tmp_path / "logs") for f in fs)
    with pytest.raises(ValueError, match="must be divisible by processes x grad_accum_steps = 1 x 3"):
        train_tokenizer(tok, data, TrainConfig(max_steps=1, batch_size=4, grad_accum_steps=3, progress=False,
                                               log_with="none"))


def test_a_time_budget_is_refused_with_several_processes():
    class TwoRanks:
        gradient_accumulation_steps, num_processes, process_index = 1, 2, 0

    with pytest.raises(ValueError, match="max_minutes=1.0 is a per-process clock: with 2 processes"):
        train_generator(tiny_generator(), tiny_data(), config(max_minutes=1.0), accelerator=TwoRanks())


def test_a_launch_for_several_processes_that_runs_as_one_is_refused(monkeypatch):
    from tokenloom.training import launch

    class FakeAccelerator:
        num_processes = 1

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="launched for 2 processes but this run has 1"):
        launch.check_process_count(FakeAccelerator())
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert launch.requested_processes(["python", "-m", "accelerate.commands.launch", "--num_processes", "2",
                                       "--cpu", "x.py"]) == 2
    assert launch.requested_processes(["accelerate", "launch", "--num_processes=4", "x.py"]) == 4
    assert launch.requested_processes(["python", "x.py", "--num_processes", "2"]) is None


def test_generator_recipe_writes_sample_grids_and_a_final_checkpoint(tmp_path):
    from tokenloom.tokenizers import build
    from tokenloom.training.generator_trainer import train_from_config

    torch.manual_seed(0)
    build("vq", image_size=16, ch=8, ch_mult=[1, 2, 2], num_res_blocks=1, z_channels=8, norm_groups=4,
          codebook_size=32, codebook_dim=4).save_pretrained(tmp_path / "tok")
    cfg = {"tokenizer": {"path": str(tmp_path / "tok")},
           "data": {"name": "digits", "split": "test", "image_size": 16},
           "generator": {"name": "raster_ar", "width": 16, "depth": 1, "num_heads": 2, "multiple_of": 16,
                         "num_classes": 10},
           "train": {"max_steps": 3, "batch_size": 8, "sample_every": 2, "checkpoint_every": 2, "log_with": "none",
                     "threads": 1}}
    out = train_from_config(cfg, output_dir=str(tmp_path / "run"), progress=False)
    assert out["train"]["steps"] == 3
    assert os.listdir(tmp_path / "run" / "generator" / "samples") == ["step-00000002.png"]
    assert [s for s, _ in ckpt.list_checkpoints(str(tmp_path / "run" / "generator" / "checkpoints"))] == [2, 3]


@pytest.mark.slow
def test_torch_compile_option_trains_and_exports_plain_weights(tmp_path):
    """``train.compile``: accelerate's inductor backend (the first compile takes tens of seconds on a CPU)."""
    model = tiny_generator(cond_dropout=0.0)
    reference = tiny_generator(cond_dropout=0.0)
    result = train_generator(model, tiny_data(), config(tmp_path, max_steps=3, compile=True))
    train_generator(reference, tiny_data(), config(max_steps=3))
    assert result.steps == 3
    exported = type(model).from_pretrained(tmp_path)
    for k, v in weights(reference).items():
        torch.testing.assert_close(weights(exported)[k], v, rtol=1e-3, atol=1e-4)



def test_ema_averages_every_trained_module_by_its_rule():
    """The EMA covers the extra modules too (a jointly trained text conditioner): each ends as the average of its
    raw weights, shadow <- d*shadow + (1 - d)*param after every step, d = min(decay, (1 + n) / (10 + n))."""
    from tokenloom.training.loop import LoopConfig, run_training

    def run(ema_decay):
        torch.manual_seed(0)
        model, extra = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
        seen = []  # raw weights before every step

        def forward(modules, batch):
            m, e = modules
            seen.append((m.weight.item(), e.weight.item()))
            return {"loss": ((m(batch[0]) + 2 * e(batch[0]) - 3.0) ** 2).mean()}

        cfg = LoopConfig(max_steps=6, batch_size=4, lr=0.1, warmup_steps=0, progress=False, threads=1,
                         log_with="none", ema_decay=ema_decay)
        _, (m, e) = run_training(model, torch.utils.data.TensorDataset(torch.ones(16, 1)), cfg, forward,
                                 param_groups=lambda mods: [{"params": [p for x in mods for p in x.parameters()]}],
                                 schedule=lambda step, progress: 1.0, extra_modules=(extra,))
        return seen, (m.weight.item(), e.weight.item())

    seen, final_raw = run(None)
    seen_ema, got = run(0.8)
    assert seen_ema == seen  # the EMA does not change training
    shadow = list(seen[0])
    for n, raw in enumerate(seen[1:] + [final_raw]):
        d = min(0.8, (1 + n) / (10 + n))
        shadow = [d * s + (1 - d) * v for s, v in zip(shadow, raw)]
    assert got == pytest.approx(shadow, rel=1e-6)
    assert abs(got[1] - final_raw[1]) > 1e-3  # the extra module holds its average, not its raw weights
