"""`tools/train.py` under the real launchers (`deepspeed`, `torchrun`), 2 CPU processes (gloo), ZeRO-3, tiny-omni
on the demo shards: kill one rank and resume, a kill inside a checkpoint write, a resume with another number
of ranks, and the export of a ZeRO-3 run loaded in a fresh process.

Tolerances: resumed vs uninterrupted weights are compared exactly (`deterministic: true`, fp32, the same
ranks, the same batches and the same reduction order: there is nothing left to differ); logits of an
export loaded in a fresh process against the training process's within 1e-5 (only the order of the
fp32 reductions of one forward may differ); the idle-encoder switch changes the loss and the gradients
by at most 1e-6 relative (it adds exact zeros).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from safetensors.torch import load_file

from data.processor import collate
from training.checkpoint import FAULT_ENV, latest_checkpoint, verify_checkpoint

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
COMMON = ["engine=deepspeed", "deepspeed=configs/deepspeed/zero3.json", "device=cpu", "deterministic=true",
          "data.batch_size=1", "data.num_workers=0", "log_every=1", "save_every=2", "keep_checkpoints=5"]


# ---- the idle-encoder switch (one process) -------------------------------------------------------------
def convo(user: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def gradients(model, batch, idle: bool) -> tuple[float, dict[str, torch.Tensor | None]]:
    from training.objectives import ObjectiveConfig, build_objective
    model.zero_grad(set_to_none=True)
    model.run_idle_encoders = idle
    try:
        result = build_objective(ObjectiveConfig(name="ordmoe"), model)(
            model, batch, backward=lambda loss: loss.backward(), step=1)
    finally:
        model.run_idle_encoders = False
    return result.loss, {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def test_idle_encoders_run_every_encoder_with_zero_gradient(tiny_omni, processor, photo, speech):
    """Text only, image only, and two audio clips of different lengths: with `run_idle_encoders` every
    encoder parameter gets a gradient (zero where the batch does not use it), and the loss and every
    gradient are those of the switch off (to 1e-6 relative)."""
    model, _ = tiny_omni
    samples = {
        "text": [{"id": "t", "conversation": convo("What is a tensor?", "An array.")}],
        "image": [{"id": "i", "conversation": convo("<image>\nHow many cats?", "2"), "images": [photo]}],
        "audio": [{"id": "a1", "conversation": convo("<audio>\nTranscribe.", "Dark suit."), "audios": [speech]},
                  {"id": "a2", "conversation": convo("<audio>\nTranscribe.", "Dark."), "audios": [speech[:9000]]}],
    }
    encoders = ("vision", "linear_proj", "audio", "linear_proj_audio")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for name, batch in samples.items():
        batch = collate([processor(s) for s in batch], processor.pad_id)
        loss, plain = gradients(model, batch, idle=False)
        idle_loss, idle = gradients(model, batch, idle=True)
        assert idle_loss == pytest.approx(loss, rel=1e-6), name
        for param, grad in idle.items():
            assert grad is not None or param not in trainable or not param.startswith(encoders), \
                f"{name}: idle {param} got no gradient"
            if plain[param] is None:
                assert grad is None or not grad.any(), f"{name}: idle {param} got a non-zero gradient"
            else:
                # relative to the tensor's largest entry: near-zero entries differ in the last bits of fp32
                scale = plain[param].abs().max().clamp_min(1e-30)
                assert (grad - plain[param]).abs().max() <= 1e-6 * scale, f"{name}: {param}"
    model.zero_grad(set_to_none=True)


def module_calls(model, batch) -> dict[str, list[int]]:
    """For every module, the number of tensors each of its calls returned, over one OrdMoE training step."""
    from training.objectives import ObjectiveConfig, build_objective
    calls: dict[str, list[int]] = {}
    handles = [module.register_forward_hook(
        lambda mod, args, out, name=name: calls.setdefault(name, []).append(
            len([t for t in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(t, torch.Tensor)])))
        for name, module in model.named_modules()]
    model.run_idle_encoders = True
    try:
        build_objective(ObjectiveConfig(name="ordmoe"), model)(model, batch, backward=lambda loss: loss.backward(),
                                                               step=1)
    finally:
        model.run_idle_encoders = False
        for handle in handles:
            handle.remove()
        model.zero_grad(set_to_none=True)
    return calls


def test_every_module_runs_and_returns_alike_whatever_the_batch_holds(tiny_omni, processor, photo, speech):
    """What ZeRO-3 needs to pair up its collectives across ranks: every module is called as often, and returns
    as many tensors (DeepSpeed hooks each for its backward gathers), for a text-only batch as for one with two
    images and three audio clips."""
    model, _ = tiny_omni
    text = [{"id": "t", "conversation": convo("What is a tensor?", "An array.")}]
    media = [{"id": "i", "conversation": convo("<image><image>\nSame?", "Yes."), "images": [photo, photo]},
             {"id": "a", "conversation": convo("<audio><audio><audio>\nSay.", "Dark suit."),
              "audios": [speech, speech[:9000], speech[:4000]]}]
    batches = [collate([processor(s) for s in samples], processor.pad_id) for samples in (text, media)]
    sparse, full = (module_calls(model, batch) for batch in batches)
    assert sparse == full, {name: (sparse.get(name), full.get(name)) for name in set(sparse) | set(full)
                            if sparse.get(name) != full.get(name)}


def test_audio_clips_project_in_one_call_as_one_by_one(tiny_omni, speech):
    """Several clips through the conv projector in one call (ZeRO-3 needs a batch-independent number of
    calls) equal each clip projected alone (1e-6)."""
    from models.omni import _project_clips
    model, _ = tiny_omni
    clips = [torch.randn(n, model.audio.output_dim) for n in (7, 12, 1)]
    with torch.no_grad():
        together = _project_clips(model.linear_proj_audio, clips)
        alone = torch.cat([model.linear_proj_audio.project(c) for c in clips])
    torch.testing.assert_close(together, alone, rtol=1e-6, atol=1e-6)


# ---- real launches of tools/train.py -------------------------------------------------------------------
_launches = iter(range(10**6))


def port() -> int:
    """A master port of this test process (other engineers' launches run beside it), new for each launch."""
    return 20000 + (os.getpid() % 1000) * 20 + next(_launches) % 20


def command(run: Path, data: Path, steps: int, launcher: str = "deepspeed", nproc: int = 2) -> list[str]:
    if launcher == "deepspeed":
        head = [str(BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(port())]
    else:
        head = [str(BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master_port", str(port())]
    return [*head, "tools/train.py", "configs/train/demo-omni.yaml", *COMMON, f"steps={steps}",
            f"output_dir={run}", f"data.shards={data}/train_shards", f"data.eval_manifest={data}/eval.jsonl",
            "--no-progress"]


def environment(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}


def train(cmd: list[str], timeout: int = 600, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=environment(**env), capture_output=True, text=True, timeout=timeout)


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(latest_checkpoint(run) / "model.safetensors"))


def assert_same_weights(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    different = [k for k in expected if not torch.equal(got[k], expected[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def kill_rank_after(process: subprocess.Popen, run: Path, step: int, rank: int = 1, timeout: float = 600) -> None:
    """SIGKILL launch rank `rank` of `process` once rank 0 logged `step` (the launcher then stops the others)."""
    deadline = time.monotonic() + timeout
    metrics = run / "metrics.jsonl"
    while not (metrics.is_file() and any(json.loads(line).get("step") == step and "loss" in json.loads(line)
                                         for line in metrics.read_text().splitlines() if line.strip())):
        assert process.poll() is None, f"the run ended (rc {process.returncode}) before step {step}"
        assert time.monotonic() < deadline, f"no step {step} within {timeout} s"
        time.sleep(0.2)
    ranks = [p for p in psutil.Process(process.pid).children(recursive=True)  # both launchers set RANK
             if "tools/train.py" in p.cmdline() and p.environ().get("RANK") == str(rank)
             and "RANK" not in p.parent().environ()]  # the rank itself, not one of its data workers
    assert len(ranks) == 1, ranks
    os.kill(ranks[0].pid, signal.SIGKILL)
    process.wait(timeout=120)


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> Path:
    from data.demo_data import build_demo_data
    out = tmp_path_factory.mktemp("demo_data")
    build_demo_data(out, samples_per_kind=4)  # 2 shards: one per rank
    return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, demo_data) -> Path:
    """A ZeRO-3 run of 4 steps, checkpoints at 2 and 4, without interruption."""
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    started = time.perf_counter()
    result = train(command(run, demo_data, steps=4))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    print(f"uninterrupted 4-step ZeRO-3 launch: {time.perf_counter() - started:.1f} s")
    return run


def test_zero3_omni_launch_trains_and_checkpoints_with_one_start_row(uninterrupted):
    """The default suite's one real launch: `deepspeed --num_gpus 2 tools/train.py` on tiny-omni under ZeRO-3
    (ranks with different modalities in their batches used to hang in a ZeRO-3 all-gather) finishes, rank 0
    alone logged one `start` row, and the checkpoints record both ranks."""
    rows = [json.loads(line) for line in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    starts = [r for r in rows if r.get("event") in ("start", "resume")]
    assert len(starts) == 1 and starts[0]["world_size"] == 2 and starts[0]["engine"] == "deepspeed", starts
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in steps)
    from models.build import build_model, load_model_config
    with torch.device("meta"):
        model = build_model(load_model_config("configs/models/tiny-omni.yaml"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert steps[0]["trainable_params"] == trainable  # full sizes, not this rank's ZeRO-3 partitions
    assert [p.name for p in sorted((uninterrupted / "checkpoints").glob("step-*"))] == ["step-00000002",
                                                                                       "step-00000004"]
    meta = verify_checkpoint(latest_checkpoint(uninterrupted))
    assert meta["world_size"] == 2 and {"trainer.pt", "trainer-rank1.pt", "rng-rank1.pt"} <= meta["files"].keys()


@pytest.mark.slow
def test_zero3_kill_one_rank_then_relaunch_resumes_to_the_uninterrupted_weights(tmp_path, demo_data, uninterrupted):
    """SIGKILL rank 1 during step 4 (after the checkpoint of step 2); the same command again resumes from
    step 2 and ends with exactly the weights of the uninterrupted run."""
    run = tmp_path / "run"
    cmd = command(run, demo_data, steps=4)
    process = subprocess.Popen(cmd, cwd=ROOT, env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_rank_after(process, run, step=3)
    assert process.returncode != 0
    assert latest_checkpoint(run).name == "step-00000002"
    result = train(cmd)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    attempts = [(r["event"], r["step"]) for r in rows if r.get("event") in ("start", "resume")]
    assert attempts == [("start", 0), ("resume", 2)], attempts  # one row per attempt
    assert verify_checkpoint(latest_checkpoint(run))["world_size"] == 2
    assert_same_weights(weights(run), weights(uninterrupted))


@pytest.mark.slow
def test_zero3_kill_inside_a_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, demo_data, uninterrupted):
    """Rank 0 SIGKILLs itself after writing the weights of checkpoint 4 (`ORDMOE_CHECKPOINT_FAULT`): step 2
    stays the latest checkpoint, verifies and loads; the relaunch ends as the uninterrupted run."""
    from training.export import load_trained
    run = tmp_path / "run"
    cmd = command(run, demo_data, steps=4)
    result = train(cmd, **{FAULT_ENV: "weights_written@4"})
    assert result.returncode != 0
    root = run / "checkpoints"
    assert any(p.name.startswith(".tmp-step-00000004.") for p in root.iterdir())  # the write it stopped
    assert latest_checkpoint(run).name == "step-00000002"
    model, processor = load_trained(run)
    assert processor is not None and sum(p.numel() for p in model.parameters()) > 0
    result = train(cmd)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert not any(p.name.startswith(".tmp-") for p in root.iterdir())
    assert_same_weights(weights(run), weights(uninterrupted))


@pytest.mark.slow
def test_torchrun_trains_and_a_resume_with_another_world_size_is_refused(tmp_path, demo_data):
    """`torchrun --nproc_per_node 2` trains (LOCAL_RANK, gloo); resuming its run with one process is refused
    before training, naming both world sizes."""
    run = tmp_path / "run"
    result = train(command(run, demo_data, steps=2, launcher="torchrun"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert verify_checkpoint(latest_checkpoint(run))["world_size"] == 2
    result = train(command(run, demo_data, steps=4, launcher="torchrun", nproc=1))
    assert result.returncode != 0  # tools/train.py exits 2; torchrun reports a failed child as 1
    assert "differs in world_size: 2 -> 1" in result.stderr, result.stderr[-3000:]
    assert latest_checkpoint(run).name == "step-00000002"


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny-omni", "tiny-ling-lite"])
def test_zero3_export_loads_in_a_fresh_process_with_the_training_logits(tmp_path, model):
    """The final checkpoint of a ZeRO-3 run (the loop's `save`: gathered weights + model files), loaded by
    `load_trained` here (another process), gives the logits the partitioned training model gave (1e-5);
    for the Ling model, `save_official` of it loads back (`load_official`) with the same logits."""
    from models.checkpoint import load_official, save_official
    from training.export import load_trained
    run = tmp_path / "run"
    cases = ROOT / "tests" / "training" / "deepspeed_cases.py"
    result = subprocess.run([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(port()), str(cases),
                             "--out", str(tmp_path / "unused.json"), "--export", str(run), "--model", model,
                             "--steps", "2"], cwd=ROOT, env=environment(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    expected = torch.load(run / "training_logits.pt", weights_only=True)
    sys.path.insert(0, str(cases.parent))
    from deepspeed_cases import global_batches
    batch = {k: v for k, v in global_batches(0, 1)[0].items() if k != "labels"}
    loaded, _ = load_trained(run)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, expected, rtol=1e-5, atol=1e-5)
    if model == "tiny-ling-lite":
        save_official(loaded, tmp_path / "official")
        official = load_official(tmp_path / "official", type(loaded)).eval()
        with torch.no_grad():
            torch.testing.assert_close(official(**batch).logits, expected, rtol=1e-5, atol=1e-5)
