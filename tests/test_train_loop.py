"""The trainer end to end through its command line (subprocesses, tiny config, CPU): config errors, metrics,
checkpoints, exact resume after a real SIGKILL, preemption by SIGTERM, and a loss that falls."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--config.train.eval_every=0", "--config.train.log_every=1", "--config.train.checkpoint_every=3"]


def _cmd(workdir, *overrides, config="configs/tiny.py:text_model=qwen3"):
    return [sys.executable, "-m", "uhd_jax.train", f"--config={config}", f"--workdir={workdir}", *overrides]


def _env():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", JAX_DEFAULT_MATMUL_PRECISION="highest")
    return env


def _run(workdir, *overrides, config="configs/tiny.py:text_model=qwen3", timeout=600):
    return subprocess.run(_cmd(workdir, *overrides, config=config), cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


def _metrics(workdir):
    """step -> the last logged row of that step (a killed run may have logged steps that were redone)."""
    out = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            out[row["step"]] = row
    return out


def _params(workdir, step):
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(os.path.join(workdir, "checkpoints")) as m:
        state = m.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    import jax

    return {jax.tree_util.keystr(p): np.asarray(a) for p, a in jax.tree_util.tree_leaves_with_path(state["params"])}


def test_resume_after_sigkill_is_exact(tmp_path):
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    r = _run(straight, "--config.train.steps=6", *FAST)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "loss " in r.stdout and "checkpoint:" in r.stdout

    # the same run, killed (SIGKILL: no chance to save) as soon as checkpoint 3 is complete, then restarted
    p = subprocess.Popen(_cmd(resumed, "--config.train.steps=6", *FAST), cwd=ROOT, env=_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ckpt3 = os.path.join(resumed, "checkpoints", "3")
    deadline = time.time() + 500
    while not os.path.isdir(ckpt3) and p.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    out = p.communicate()[0]
    assert p.returncode == -signal.SIGKILL, out[-3000:]
    assert not os.path.isdir(os.path.join(resumed, "checkpoints", "6")), "the run finished before it was killed"
    r = _run(resumed, "--config.train.steps=6", *FAST)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "resumed from step 3" in r.stdout

    a, b = _metrics(straight), _metrics(resumed)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    for s in range(1, 7):
        assert a[s]["loss"] == b[s]["loss"] and a[s]["grad_norm"] == b[s]["grad_norm"], s
    pa, pb = _params(straight, 6), _params(resumed, 6)
    assert pa.keys() == pb.keys()
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)


def test_sigterm_saves_and_exits_zero(tmp_path):
    workdir = str(tmp_path / "run")
    p = subprocess.Popen(_cmd(workdir, "--config.train.steps=1000", *FAST), cwd=ROOT, env=_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 500
    metrics = os.path.join(workdir, "metrics.jsonl")
    while p.poll() is None and time.time() < deadline:
        if os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= 4:
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    out = p.communicate(timeout=300)[0]
    assert p.returncode == 0, out[-3000:]
    assert "SIGTERM at step" in out
    step = int(out.split("SIGTERM at step ")[1].split(":")[0])
    assert os.path.isdir(os.path.join(workdir, "checkpoints", str(step))) and step < 1000


def test_metrics_and_tensorboard_and_config_saved(tmp_path):
    workdir = str(tmp_path / "run")
    r = _run(workdir, "--config.train.steps=4", "--config.optimizer.warmup_steps=1", "--config.train.log_every=2",
             "--config.train.eval_every=2",
             "--config.train.eval_batches=1")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = _metrics(workdir)
    assert sorted(rows) == [1, 2, 4]
    for row in rows.values():
        for k in ("loss", "grad_norm", "tokens_per_s", "step_time_s", "data_wait_share", "eta_s", "mfu"):
            assert k in row, k
    assert "eval_loss" in rows[2] and "eval_loss" in rows[4]
    assert rows[2]["compiles"] > 0 and rows[4]["compiles"] == 0  # steps 3-4 and the second eval reuse programs
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["train"]["steps"] == 4
    losses = {step: v for step, tag, v in _tb_scalars(os.path.join(workdir, "tb")) if tag == "loss"}
    assert losses == pytest.approx({s: rows[s]["loss"] for s in (1, 2, 4)}, rel=1e-6)

    # any step exports to a Hugging Face directory that transformers loads, with our model's logits
    hf = str(tmp_path / "hf")
    r = subprocess.run([sys.executable, "-m", "uhd_jax.convert", "jax-to-hf", "--ckpt",
                        os.path.join(workdir, "checkpoints", "4"), "--out", hf], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    import jax
    import torch
    from transformers import MiniCPMV4_6ForConditionalGeneration

    from uhd_jax.convert import load_checkpoint
    from uhd_jax.model.text_model import TextModel

    cfg, params = load_checkpoint(os.path.join(workdir, "checkpoints", "4"))
    ids = np.random.default_rng(0).integers(0, 400, (1, 12))
    ours = TextModel(cfg.text, attention_impl="xla").apply({"params": params["text"]}, ids)[0]
    ref = MiniCPMV4_6ForConditionalGeneration.from_pretrained(hf).float().eval()
    with torch.no_grad():
        want = ref(input_ids=torch.from_numpy(ids)).logits.numpy()
    got = np.asarray(ours)[..., :cfg.text.vocab_size]
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-4
    assert os.path.isfile(os.path.join(hf, "tokenizer.json"))  # the tiny tokenizer went along


def _tb_scalars(directory):
    """(step, tag, value) from TensorBoard event files, read as TFRecords (u64 length, u32 crc, data, u32 crc)."""
    import struct

    from tensorboardX.proto import event_pb2

    out = []
    for name in sorted(os.listdir(directory)):
        with open(os.path.join(directory, name), "rb") as f:
            data = f.read()
        pos = 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            for v in event.summary.value:
                out.append((event.step, v.tag, v.simple_value))
    return out


@pytest.mark.parametrize("override,needle", [
    ("--config.train.stepz=3", "stepz"),
    ("--config.train.steps=abc", "steps"),
    ("--config.model.name=huge", "model.name"),
    ("--config.optimizer.warmup_steps=5", "warmup_steps"),
])
def test_bad_config_values_are_usage_errors(tmp_path, override, needle):
    r = _run(str(tmp_path / "run"), override, "--config.train.steps=1")
    assert r.returncode != 0
    err = r.stderr + r.stdout
    assert needle in err and "Traceback" not in err, err[-2000:]


def test_tiny_config_learns(tmp_path):
    """The README's first command, shortened: on the built-in data the loss falls by at least half. The workdir is
    relative, as the README's default runs/<config> is (Orbax refuses relative paths: the trainer must resolve it)."""
    relative = os.path.relpath(str(tmp_path / "run"), ROOT)
    r = _run(relative, "--config.train.steps=40", "--config.train.eval_every=0",
             "--config.train.checkpoint_every=40", config="configs/tiny.py")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = _metrics(str(tmp_path / "run"))
    assert rows[40]["loss"] < 0.5 * rows[1]["loss"], (rows[1]["loss"], rows[40]["loss"])
    assert "(fell)" in r.stdout
    assert os.path.isdir(str(tmp_path / "run" / "checkpoints" / "40"))


def test_resume_on_a_different_mesh(tmp_path):
    """Saved on 8 devices (fsdp=8), resumed on 4 (fsdp=4): Orbax restores the sharded state straight into the new
    shardings and the run goes on; step 4's loss equals an 8-device run's to float32 rounding (dense LLM)."""
    def run(workdir, devices, steps):
        env = _env()
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
        # a constant learning rate: the runs differ in train.steps, which would otherwise change the schedule
        r = subprocess.run(_cmd(workdir, f"--config.train.steps={steps}", "--config.optimizer.warmup_steps=0",
                                "--config.optimizer.end_lr_ratio=1.0",
                                "--config.train.eval_every=0", "--config.train.log_every=1",
                                "--config.train.checkpoint_every=3"),
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        return r.stdout

    moved, straight = str(tmp_path / "moved"), str(tmp_path / "straight")
    assert "'fsdp': 8" in run(moved, 8, 3)
    out = run(moved, 4, 4)
    assert "resumed from step 3" in out
    run(straight, 8, 4)
    a, b = _metrics(moved), _metrics(straight)
    assert a[3]["loss"] == b[3]["loss"]
    assert abs(a[4]["loss"] - b[4]["loss"]) <= 1e-5 * b[4]["loss"], (a[4], b[4])


def test_grain_pipeline_run_resumes_exactly(tmp_path):
    """The synthetic OCR source through the grain pipeline: 4 steps straight equal 2 steps + a restart + 2 more
    (the data iterator's state is in the checkpoint; a constant lr, so train.steps does not change the schedule)."""
    common = ["--config.train.batch_size=2", "--config.optimizer.warmup_steps=0", "--config.optimizer.end_lr_ratio=1.0",
              "--config.train.eval_every=0", "--config.train.log_every=1", "--config.train.checkpoint_every=2"]
    cfg = "configs/tiny.py:data=synthetic_ocr,text_model=qwen3"
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    for workdir, steps in ((straight, 4), (resumed, 2), (resumed, 4)):
        r = _run(workdir, f"--config.train.steps={steps}", *common, config=cfg)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "resumed from step 2" in r.stdout
    a, b = _metrics(straight), _metrics(resumed)
    assert [a[s]["loss"] for s in range(1, 5)] == [b[s]["loss"] for s in range(1, 5)]
    pa, pb = _params(straight, 4), _params(resumed, 4)
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)
