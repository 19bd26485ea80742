"""Training (style §12.7): the loss falls and one batch overfits, resume is bitwise, a checkpoint
killed mid-write leaves the previous one usable, two FSDP2 processes match one, an entropy model
trained here patches a BLT, overrides and run.toml precedence, LR schedules, the log line, --help.

CPU, fp32, tiny presets, no compile, one thread (conftest).
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import bltkit.train as train_mod
from bltkit import distributed
from bltkit.checkpoint import WEIGHTS, CheckpointError, load_entropy_model, load_model, save_model
from bltkit.cli import main as cli_main
from bltkit.data import BatchLoader
from bltkit.metrics import format_line
from bltkit.optim import OptimConfig, clip_and_step, lr_factor, param_groups
from bltkit.train import resolve_config, train

ASSET = Path(__file__).parent / "assets" / "pride_20k.txt"
LN_V = math.log(260)  # the loss of a uniform prediction over the 260 ids
# small rows, static patches (no entropy model needed), lr 3e-3 so 30 steps visibly learn
BASE = ["model.patcher.mode=static", "train.seq_len=64", "train.batch_size=4", "train.eval_batches=0",
        "train.log_every=1", "train.ckpt_every=0", "optim.lr=3e-3", "train.device=cpu"]

_WORDS = ["the", "of", "and", "to", "a", "in", "that", "was", "her", "it", "his", "she", "he", "for", "had", "with", "you", "as", "not", "be", "but", "at", "on", "which", "by", "have", "is", "all", "my", "so", "him", "mr", "could", "been", "very", "no", "would", "were", "when", "from", "this", "there", "said", "elizabeth", "they", "more", "one", "an", "much", "must", "what", "will", "their", "darcy", "such", "your", "than", "bennet", "who", "any", "do", "should", "then", "sister", "herself", "before", "think", "jane", "being", "know", "did", "time", "soon", "only", "well", "some", "see", "good"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """The shipped ~20 KB Austen slice, or English-like text of the same size when absent."""
    if ASSET.is_file():
        return ASSET
    rng = random.Random(0)
    paras = []
    while sum(map(len, paras)) < 20_000:
        sents = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 16))).capitalize()
                 + rng.choice([".", ".", ",", "?", "!"]) for _ in range(rng.randint(2, 6))]
        paras.append(" ".join(sents))
    path = tmp_path_factory.mktemp("corpus") / "english.txt"
    path.write_text("\n\n".join(paras) + "\n")
    return path


def _run(out: Path, data: Path, *tokens: str, preset: str = "tiny", entropy_model=None) -> list[dict]:
    cfg = resolve_config(preset, [str(data)], None, [*BASE, *tokens], entropy_model=entropy_model, run_dir=out)
    train(cfg, out, entropy_model=entropy_model, argv=["test"])
    return _rows(out)


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _losses(rows: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@contextmanager
def recording_batches():
    """Every training batch served, in order (to check that resume neither repeats nor drops)."""
    seen: list[torch.Tensor] = []
    real = BatchLoader.next_batch

    def next_batch(self):
        batch = real(self)
        seen.append(batch.tokens.clone())
        return batch

    BatchLoader.next_batch = next_batch
    try:
        yield seen
    finally:
        BatchLoader.next_batch = real


# -- learning -------------------------------------------------------------------------------------


def test_tiny_blt_loss_falls(corpus, tmp_path):
    rows = _run(tmp_path / "run", corpus, "train.steps=30", "train.seq_len=128", "optim.lr=6e-3")
    losses = list(_losses(rows).values())
    assert len(losses) == 30
    # step 1 scores the random init: about ln 260 = 5.56 nats (the init is not exactly uniform)
    assert abs(losses[0] - LN_V) < 1.0
    # 30 steps of 4 x 128 bytes: the mean of the last 5 must be below 3.6 nats, under ln 40 = 3.69,
    # the loss of a model that only knows which ~40 characters occur, so it has learned their
    # frequencies at least. Measured: 3.24 on pride_20k.txt, 2.90 on the fallback text
    # (English unigram entropy is ~2.9 nats); the margin covers the noise of 4-row batches.
    assert sum(losses[-5:]) / 5 < 3.6, losses
    assert all(math.isfinite(r["grad_norm"]) for r in rows)
    assert rows[-1]["bytes_per_s"] > 0
    assert rows[-1]["mean_patch_len"] == pytest.approx(128 / 33)  # [1] + 32 patches of 4 (static)
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    assert rows[-1]["patch_slots"] is None  # SDPA: no padding
    assert rows[-1]["packed_slots"] is None


def test_padded_patch_slots_are_logged(corpus, tmp_path):
    """metrics.jsonl shows the padded patch count the step runs: 33 static patches per row,
    padded to a multiple of 16 (train.pad_patches) -> 48 slots."""
    rows = _run(tmp_path / "run", corpus, "train.steps=2", "train.seq_len=128", "train.pad_patches=16")
    assert [r["patch_slots"] for r in rows] == [48, 48]
    assert rows[-1]["mean_patch_len"] == pytest.approx(128 / 33)  # the empty slots are not patches


def test_overfits_one_batch(tmp_path):
    """A stream of exactly batch_size windows: every step sees the same 2 rows of 64 bytes."""
    text = "It is a truth universally acknowledged, that a single man in possession of a good fortune, m"
    data = tmp_path / "one.txt"
    data.write_text(text + text[:35])  # 127 bytes + BOS + EOS = 129 ids: 2 windows of 65 (sharing one)
    rows = _run(tmp_path / "run", data, "train.steps=60", "train.batch_size=2", "data.val_fraction=0",
                "optim.warmup=5")
    losses = list(_losses(rows).values())
    # 128 targets memorised: far below what any model of English text reaches (~1 nat/byte for
    # the best LMs). Measured: 0.14 after 60 steps (6.1 at step 1).
    assert losses[-1] < 0.5, losses[::10]


# -- resume and checkpoints -----------------------------------------------------------------------


class _Stop(Exception):
    pass


@pytest.fixture(scope="module")
def baseline(corpus, tmp_path_factory):
    """12 uninterrupted steps with a checkpoint every 6, keeping only the last."""
    out = tmp_path_factory.mktemp("baseline") / "run"
    with recording_batches() as seen:
        rows = _run(out, corpus, "train.steps=12", "train.ckpt_every=6", "train.keep_last=1")
    return out, rows, seen


def test_resume_is_bitwise(baseline, corpus, tmp_path, monkeypatch):
    base_out, base_rows, base_batches = baseline
    assert sorted(p.name for p in (base_out / "checkpoints").iterdir()) == ["latest", "step_000012"]  # keep_last 1
    real_save = distributed.save_checkpoint

    def save_then_stop(root, step, *args, **kwargs):
        path = real_save(root, step, *args, **kwargs)
        if step == 6:
            raise _Stop  # stopped right after the step-6 checkpoint
        return path

    monkeypatch.setattr(distributed, "save_checkpoint", save_then_stop)
    out = tmp_path / "run"
    with recording_batches() as seen:
        with pytest.raises(_Stop):
            _run(out, corpus, "train.steps=12", "train.ckpt_every=6", "train.keep_last=1")
        monkeypatch.setattr(distributed, "save_checkpoint", real_save)
        assert len(seen) == 6
        rows = _run(out, corpus, "train.steps=12", "train.ckpt_every=6", "train.keep_last=1")
    assert [r["step"] for r in rows] == list(range(1, 13))
    for mine, ref in zip(rows, base_rows, strict=True):  # bitwise on CPU: same data, state and math
        assert (mine["loss"], mine["grad_norm"], mine["lr"]) == (ref["loss"], ref["grad_norm"], ref["lr"])
    assert len(seen) == len(base_batches) == 12  # no batch repeated or skipped
    assert all(torch.equal(a, b) for a, b in zip(seen, base_batches, strict=True))
    a, b = load_model(out / "model"), load_model(base_out / "model")
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_time_limit_stops_with_a_checkpoint_and_resumes_bitwise(baseline, corpus, tmp_path):
    """train.time_limit (a job slot): every run stops at its first log step past the limit with a
    checkpoint; re-running the same command goes on, and the pieces equal one uninterrupted run."""
    _, base_rows, _ = baseline
    out, runs = tmp_path / "run", 0
    args = ("train.steps=12", "train.ckpt_every=6", "train.keep_last=1", "train.time_limit=1e-9", "train.log_every=4")
    while not (out / "metrics.jsonl").is_file() or _rows(out)[-1]["step"] < 12:
        _run(out, corpus, *args)
        runs += 1
        assert runs <= 3
        assert (out / "model" / "model.safetensors").is_file()  # the weights so far, each time
    assert runs == 3  # stopped after steps 4 and 8, finished at 12
    rows = _rows(out)
    assert [r["step"] for r in rows] == [4, 8, 12]
    # the last window's loss covers steps 9..12 in both; the lr of a step is the schedule's either way
    assert rows[-1]["lr"] == base_rows[11]["lr"]
    a, b = load_model(out / "model"), load_model(baseline[0] / "model")
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_stop_at_a_step_and_resume_bitwise(baseline, corpus, tmp_path):
    """train.stop_at stops after that step with a checkpoint and the weights so far (the schedule
    still runs to train.steps); resuming with stop_at=0 gives the uninterrupted run bitwise."""
    out = tmp_path / "run"
    _run(out, corpus, "train.steps=12", "train.ckpt_every=0", "train.log_every=4", "train.stop_at=5")
    assert [r["step"] for r in _rows(out)] == [4]
    assert (out / "model" / "model.safetensors").is_file()
    _run(out, corpus, "train.steps=12", "train.ckpt_every=0", "train.log_every=4")
    assert [r["step"] for r in _rows(out)] == [4, 8, 12]
    a, b = load_model(out / "model"), load_model(baseline[0] / "model")
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_kill_during_checkpoint_keeps_previous(baseline, corpus, tmp_path, monkeypatch):
    import torch.distributed.checkpoint as dcp

    _, base_rows, _ = baseline
    real_save = dcp.save

    def die_after_shards(state, checkpoint_id, **kwargs):
        real_save(state, checkpoint_id=checkpoint_id, **kwargs)  # the model/optimizer shards land
        if "step_000012" in str(checkpoint_id):
            raise _Stop  # ...and the process dies before its rank file, meta.json and the rename

    monkeypatch.setattr(dcp, "save", die_after_shards)
    out = tmp_path / "run"
    with pytest.raises(_Stop):
        _run(out, corpus, "train.steps=12", "train.ckpt_every=6")
    monkeypatch.setattr(dcp, "save", real_save)
    root = out / "checkpoints"
    assert (root / ".tmp-step_000012" / ".metadata").is_file()
    assert not (root / "step_000012").exists()
    assert (root / "latest").read_text().strip() == "step_000006"
    assert distributed.latest_checkpoint(root) == root / "step_000006"
    cli_main(["train", "--out", str(out)])  # resume by the run directory alone (its config.json)
    rows = _rows(out)
    assert not (root / ".tmp-step_000012").exists()
    assert (root / "latest").read_text().strip() == "step_000012"
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert [r["loss"] for r in rows] == [r["loss"] for r in base_rows]


@pytest.fixture(scope="module")
def four_steps(corpus, tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4 (copy it before changing it)."""
    out = tmp_path_factory.mktemp("four") / "run"
    rows = _run(out, corpus, "train.steps=4", "train.ckpt_every=2")
    return out, rows


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_failed_resume_leaves_the_run_as_it_was(four_steps, corpus, tmp_path):
    """A resume whose data position does not fit (seq_len 64 -> 32) fails naming the setting,
    before config.json is touched: the plain `blt train --out RUN_DIR` still resumes."""
    out = _copy(four_steps[0], tmp_path / "run")
    before = (out / "config.json").read_text()
    cfg = resolve_config(None, None, None, ["train.steps=6", "train.seq_len=32"], run_dir=out)
    with pytest.raises(ValueError, match=r"train\.seq_len is 64 in the run but 32 was asked"):
        train(cfg, out, argv=["test"])
    assert (out / "config.json").read_text() == before
    cli_main(["train", "--out", str(out), "train.steps=5"])
    assert [r["step"] for r in _rows(out)] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("damage", ["distcp", "rank_file", "metadata", "meta_json"])
def test_damaged_checkpoint_falls_back_to_the_previous_one(four_steps, corpus, tmp_path, capsys, damage):
    """A truncated shard or rank file, or a lost .metadata: resume warns, sets the damaged step
    aside (renamed, not deleted) and continues from the one before, bitwise as the first run."""
    out = _copy(four_steps[0], tmp_path / "run")
    step4 = out / "checkpoints" / "step_000004"
    if damage == "metadata":
        (step4 / ".metadata").unlink()
    elif damage == "meta_json":
        (step4 / "meta.json").write_text("{bad")
    else:
        f = step4 / ("__0_0.distcp" if damage == "distcp" else "rank_00000.pt")
        f.write_bytes(f.read_bytes()[:100])
    rows = _run(out, corpus, "train.steps=4", "train.ckpt_every=2")
    err = capsys.readouterr().out
    assert "step_000004 is unreadable" in err
    assert "moved it to step_000004.broken and resumed from step_000002" in err
    if damage == "meta_json":  # the file is named, not just the JSON parser's complaint
        assert f"{step4 / 'meta.json'}: Expecting property name" in err
    assert (out / "checkpoints" / "step_000004.broken" / "meta.json").is_file()
    assert [r["loss"] for r in rows] == [r["loss"] for r in four_steps[1]]


def test_no_intact_checkpoint_is_a_clear_error(four_steps, corpus, tmp_path):
    out = _copy(four_steps[0], tmp_path / "run")
    before = (out / "config.json").read_text()
    for step in ("step_000002", "step_000004"):
        (out / "checkpoints" / step / "rank_00000.pt").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="no intact checkpoint") as e:
        _run(out, corpus, "train.steps=6")
    assert "step_000004 is unreadable" in str(e.value)
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_000002", "step_000004"]
    assert (out / "config.json").read_text() == before


def test_nothing_to_train_says_so(four_steps, tmp_path, capsys):
    """A run at step 4 asked for train.steps=4 or 3: one line, and config.json keeps steps=4."""
    out = _copy(four_steps[0], tmp_path / "run")
    for steps in (4, 3):
        cli_main(["train", "--out", str(out), f"train.steps={steps}"])
        assert f"already at step 4 >= train.steps={steps}: nothing to train" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["train"]["steps"] == 4
    assert [r["step"] for r in _rows(out)] == [1, 2, 3, 4]
    # killed between the last checkpoint and the export: the rerun writes the model from it, also
    # over an earlier step's export (export_every, a time limit) that a kill left in RUN_DIR/model
    want = load_model(out / "model").state_dict()
    stale = load_model(out / "model")
    with torch.no_grad():
        next(stale.parameters()).add_(1.0)
    for earlier in (None, stale):
        shutil.rmtree(out / "model")
        if earlier is not None:
            save_model(earlier, out / "model")
        cli_main(["train", "--out", str(out)])
        assert "wrote RUN_DIR/model from step_000004" in capsys.readouterr().out
        got = load_model(out / "model").state_dict()
        assert all(torch.equal(want[k], got[k]) for k in want)


def test_ctrl_c_names_the_checkpoint_that_resumes(four_steps, corpus, tmp_path, capsys, monkeypatch):
    """Ctrl-C during the step-4 checkpoint (DCP wraps it in a CheckpointException): exit 130 and one
    line naming step 2; the same command then resumes from it as an uninterrupted run."""
    import torch.distributed.checkpoint as dcp

    real_save = dcp.save

    def interrupted_save(state, checkpoint_id, **kwargs):
        if "step_000004" in str(checkpoint_id):
            raise dcp.CheckpointException("write", {0: (KeyboardInterrupt(), None)})
        return real_save(state, checkpoint_id=checkpoint_id, **kwargs)

    out = tmp_path / "run"
    cmd = ["train", "--preset", "tiny", "--data", str(corpus), "--out", str(out), *BASE, "train.steps=4",
           "train.ckpt_every=2"]
    monkeypatch.setattr(dcp, "save", interrupted_save)
    with pytest.raises(SystemExit) as e:
        cli_main(cmd)
    assert e.value.code == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith("interrupted: the last checkpoint is step 2 (")
    assert "the same command resumes" in err
    monkeypatch.setattr(dcp, "save", real_save)
    cli_main(cmd)
    assert [r["loss"] for r in _rows(out)] == [r["loss"] for r in four_steps[1]]


def test_a_users_file_in_run_dir_model_is_refused_before_training(corpus, tmp_path):
    """RUN_DIR/model is replaced whole by the exports: a file of the user's there stops the run at
    its start (it failed at the final export, after the training)."""
    out = tmp_path / "run"
    (out / "model").mkdir(parents=True)
    (out / "model" / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match=r"notes\.txt"):
        _run(out, corpus, "train.steps=1")
    assert not (out / "metrics.jsonl").exists()
    assert (out / "model" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("cause", [KeyboardInterrupt, torch.OutOfMemoryError])
def test_interrupted_load_keeps_the_checkpoint(four_steps, corpus, tmp_path, monkeypatch, cause):
    """A Ctrl-C (DCP wraps it in a CheckpointException) or running out of memory while the newest
    checkpoint loads says nothing of its files: it stops the run, and the checkpoint is not set aside
    as damaged (the run would then resume from an older one)."""
    import torch.distributed.checkpoint as dcp

    out = _copy(four_steps[0], tmp_path / "run")

    def failing_load(state, checkpoint_id, **kwargs):
        raise dcp.CheckpointException("read", {0: (cause(), None)})

    monkeypatch.setattr(dcp, "load", failing_load)
    with pytest.raises(cause):
        _run(out, corpus, "train.steps=6")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_000002", "step_000004"]


def test_every_rank_learns_of_a_load_stopped_anywhere(four_steps, corpus, tmp_path, monkeypatch):
    """A rank that runs out of memory while a checkpoint loads, outside DCP (which would tell every
    rank), still joins the collective before it raises, so the others are not left waiting; the
    others then stop too (here: one process told by the sum that another rank stopped), and the
    checkpoint is kept as it is."""
    out = _copy(four_steps[0], tmp_path / "run")
    real = torch.load

    def oom_on_rank_state(f, *args, **kwargs):
        if str(f).endswith(".pt") and "rank_" in str(f):
            raise torch.OutOfMemoryError("CUDA out of memory (test)")
        return real(f, *args, **kwargs)

    reduced = []
    real_sum = distributed.all_reduce_sum
    monkeypatch.setattr(distributed, "all_reduce_sum", lambda t: reduced.append(t.clone()) or real_sum(t))
    monkeypatch.setattr(torch, "load", oom_on_rank_state)
    with pytest.raises(torch.OutOfMemoryError):
        _run(out, corpus, "train.steps=6")
    assert any(t.tolist() == [1.0, 1.0] for t in reduced)  # the flags went out before the raise
    monkeypatch.setattr(torch, "load", real)
    monkeypatch.setattr(distributed, "all_reduce_sum", lambda t: t.fill_(1.0))  # another rank's stop
    with pytest.raises(RuntimeError, match="another rank was interrupted or ran out of memory loading checkpoint"):
        _run(out, corpus, "train.steps=6")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_000002", "step_000004"]


def test_no_validation_split_means_no_evaluation(corpus, tmp_path, capsys):
    """data.val_fraction=0 (docs: an empty validation split) trains, and says once that it does not evaluate."""
    rows = _run(tmp_path / "run", corpus, "train.steps=2", "data.val_fraction=0", "train.eval_batches=1",
                "train.eval_every=1")
    assert [r["step"] for r in rows] == [1, 2]
    assert not any("val_bpb" in r for r in rows)
    assert capsys.readouterr().out.count("no evaluation") == 1


def test_unknown_or_absent_device_is_a_value_error(corpus, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="'tpu' is not a torch device"):
        distributed.resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="'cuda': CUDA is not available here"):
        _run(tmp_path / "cuda", corpus, "train.steps=1", "train.device=cuda")


def test_out_naming_a_file_is_one_line(corpus, tmp_path, capsys):
    afile = tmp_path / "afile.txt"
    afile.write_text("notes\n")
    with pytest.raises(SystemExit) as e:
        cli_main(["train", "--preset", "tiny", "--data", str(corpus), "--out", str(afile), *BASE, "train.steps=1"])
    assert e.value.code == 2
    assert "is a file" in capsys.readouterr().err
    assert afile.read_text() == "notes\n"


@pytest.mark.parametrize("key", ["log_every", "ckpt_every", "eval_every", "export_every", "eval_batches"])
def test_negative_every_is_refused(corpus, key):
    with pytest.raises(ValueError, match=rf"train\.{key} must be >= 0, got -3"):
        resolve_config("tiny", [str(corpus)], None, [*BASE, f"train.{key}=-3"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's refusal")
def test_flex_on_a_cpu_is_refused(corpus, tmp_path):
    """FlexAttention has no backward on a CPU: train.attn_impl=flex there is a one-line error (it was a
    NotImplementedError traceback at the first backward), before the run directory is written."""
    with pytest.raises(ValueError, match=r"train\.attn_impl=flex needs a GPU"):
        _run(tmp_path / "run", corpus, "train.steps=1", "train.attn_impl=flex")
    assert not (tmp_path / "run" / "config.json").exists()


def test_grad_accum_matches_a_bigger_batch(corpus, tmp_path):
    """2 micro-batches of 2 rows = 1 batch of 4 rows: the same rows, one normalisation by the
    step's target count; only the summation order differs (rtol 1e-5)."""
    big = _run(tmp_path / "big", corpus, "train.steps=3")
    accum = _run(tmp_path / "accum", corpus, "train.steps=3", "train.batch_size=2", "train.grad_accum=2")
    for a, b in zip(big, accum, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)


def test_compiled_blocks_match_eager(corpus, tmp_path):
    """train.compile=true (every block compiled, patch counts padded) learns what the eager run
    learns: the same losses for 3 steps within 1e-5 relative (inductor's fused CPU kernels sum in
    another order: 2e-7 measured at step 3; padding patches changes no logit). A wrong gradient
    would show at steps 2-3, where the loss moves by ~5 % a step."""
    import shutil

    if not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("inductor's CPU kernels need a C++ compiler")
    eager = _run(tmp_path / "eager", corpus, "train.steps=3")
    try:
        compiled = _run(tmp_path / "compiled", corpus, "train.steps=3", "train.compile=true")
    finally:
        torch._dynamo.reset()
    assert [r["step"] for r in compiled] == [r["step"] for r in eager]
    for a, b in zip(eager, compiled, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)


def _torchrun_two(out: Path, data: Path, *tokens: str) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node=2 -m bltkit train` (gloo, CPU) with 2 rows per process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "bltkit",
           "train", "--preset", "tiny", "--data", str(data), "--out", str(out), *BASE, *tokens, "train.batch_size=2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow  # ~25 s on 2 cores: two fresh interpreters import torch and join a gloo group
def test_two_fsdp_processes_match_one(corpus, tmp_path):
    """2 gloo processes x 2 rows with FSDP2 vs 1 process x 4 rows: the same global batches
    (rank r takes slice r of each global batch). Only the reduction order differs (per-rank
    partial sums, then a sum over ranks), so losses agree to fp32 rounding: rtol 1e-5."""
    common = ["train.steps=4", "train.ckpt_every=2", "train.eval_every=2", "train.eval_batches=1"]
    one = _run(tmp_path / "one", corpus, *common)
    _torchrun_two(tmp_path / "two", corpus, *common)
    two = _rows(tmp_path / "two")
    assert [r["step"] for r in two] == [1, 2, 3, 4]
    for a, b in zip(one, two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        assert b.get("val_bpb") == pytest.approx(a.get("val_bpb"), rel=1e-5)
    assert {p.name for p in (tmp_path / "two" / "checkpoints" / "step_000004").glob("*.distcp")} == \
        {"__0_0.distcp", "__1_0.distcp"}
    m1, m2 = load_model(tmp_path / "one" / "model"), load_model(tmp_path / "two" / "model")
    for k, v in m1.state_dict().items():
        torch.testing.assert_close(m2.state_dict()[k], v, rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # ~25 s on 2 cores
def test_two_processes_stop_at_time_limit_and_one_resumes(corpus, tmp_path):
    """2 gloo processes stop together at train.time_limit (rank 0's clock decides) with a sharded
    checkpoint; one process resumes it (DCP reshards 2 -> 1) and the losses continue as in an
    uninterrupted one-process run with the same global batch (rtol 1e-5, reduction order)."""
    common = ["train.steps=4", "train.ckpt_every=0", "train.eval_batches=0", "train.log_every=2"]
    one = _run(tmp_path / "one", corpus, *common)
    proc = _torchrun_two(tmp_path / "two", corpus, *common, "train.time_limit=1e-9")
    assert "stopped at step 2 of 4" in proc.stdout + proc.stderr
    assert [r["step"] for r in _rows(tmp_path / "two")] == [2]
    rows = _run(tmp_path / "two", corpus, *common)  # one process, 4 rows: the same global batch
    assert [r["step"] for r in rows] == [2, 4]
    for a, b in zip(one, rows, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)


# -- entropy model --------------------------------------------------------------------------------


def test_entropy_model_trains_and_patches_a_blt(corpus, tmp_path):
    ent_out = tmp_path / "ent"
    cli_main(["train", "--preset", "entropy-tiny", "--data", str(corpus), "--out", str(ent_out),
              "train.steps=10", "train.seq_len=64", "train.batch_size=4", "train.eval_batches=1",
              "train.ckpt_every=0", "optim.lr=3e-3", "train.device=cpu"])
    rows = _rows(ent_out)
    assert rows[-1]["loss"] < LN_V
    assert rows[-1]["mean_patch_len"] is None
    assert "val_bpb" in rows[-1]
    patcher = load_entropy_model(ent_out / "model")
    assert type(patcher).__name__ == "EntropyModel"
    # a BLT patching online with it: the patcher stays frozen and travels with the export
    blt_out = tmp_path / "blt"
    rows = _run(blt_out, corpus, "train.steps=2", "model.patcher.mode=entropy", entropy_model=ent_out / "model")
    assert rows[-1]["mean_patch_len"] > 0
    blt = load_model(blt_out / "model")
    for k, v in patcher.state_dict().items():
        assert torch.equal(blt.entropy_model.state_dict()[k], v)
    assert load_entropy_model(blt_out / "model").config == patcher.config
    x = torch.tensor([[1, *(b + 4 for b in b"It is a truth universally acknowledged")]])
    assert blt.patch(x).sum() == x.shape[1] + 1


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_patcher_dtype(corpus, tmp_path, monkeypatch, dtype):
    """train.patcher_dtype: the frozen patcher computes in fp32 by default (spec §3.3) and under
    bf16 autocast when asked (~3x cheaper on a GPU, docs/training.md); a bad value is refused."""
    from bltkit.model.entropy import EntropyModel

    seen = []
    real = EntropyModel.forward

    def forward(self, *args, **kwargs):
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else torch.float32)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(EntropyModel, "forward", forward)
    ent = Path(train_mod.__file__).parent / "models" / "default" / "entropy_model"
    rows = _run(tmp_path, corpus, "train.steps=2", "model.patcher.mode=entropy", f"train.patcher_dtype={dtype}",
                entropy_model=ent)
    assert len(seen) == 2  # one patcher call per step
    assert set(seen) == {torch.bfloat16 if dtype == "bf16" else torch.float32}
    assert rows[-1]["mean_patch_len"] > 1
    with pytest.raises(ValueError, match=r"train\.patcher_dtype must be one of fp32, bf16, got 'fp16'"):
        resolve_config("tiny", [str(corpus)], None, ["model.patcher.mode=space", "train.patcher_dtype=fp16"])


def _entropy_dir(path: Path, seed: int, **changes) -> Path:
    """An untrained entropy-tiny model directory (patches a BLT as well as a trained one, for these tests)."""
    import dataclasses

    from bltkit.checkpoint import init_model, save_model
    from bltkit.presets import entropy_tiny

    return save_model(init_model(dataclasses.replace(entropy_tiny(), **changes), seed=seed), path)


def test_resume_with_another_entropy_model_keeps_the_runs_own(corpus, tmp_path, capsys):
    """The checkpoint holds the patcher the run trained with: a resume given another one (here of
    another shape, which used to fail as 'the model config differs') says it keeps the run's copy."""
    from safetensors.torch import load_file

    a, b = _entropy_dir(tmp_path / "a", 0), _entropy_dir(tmp_path / "b", 1, dim=64)
    out = tmp_path / "run"
    _run(out, corpus, "train.steps=1", "model.patcher.mode=entropy", entropy_model=a)
    capsys.readouterr()
    _run(out, corpus, "train.steps=2", "model.patcher.mode=entropy", entropy_model=b)
    said = capsys.readouterr().out
    assert f"note: --entropy-model {b} is not this run's patcher: resuming with the run's own copy " \
           f"{out / 'entropy_model'}" in said
    assert [r["step"] for r in _rows(out)] == [1, 2]
    assert load_file(str(out / "model" / "entropy_model" / WEIGHTS)).keys() == load_file(str(a / WEIGHTS)).keys()
    assert json.loads((out / "model" / "entropy_model" / "config.json").read_text())["dim"] == 32
    _run(out, corpus, "train.steps=3", "model.patcher.mode=entropy", entropy_model=a)  # its own: no note
    assert "not this run's patcher" not in capsys.readouterr().out
    # a bf16 source: the run's copy holds its weights in fp32, the same weights (no note either)
    a16 = save_model(load_entropy_model(a).to(torch.bfloat16), tmp_path / "a16")
    out16 = tmp_path / "run16"
    _run(out16, corpus, "train.steps=1", "model.patcher.mode=entropy", entropy_model=a16)
    _run(out16, corpus, "train.steps=2", "model.patcher.mode=entropy", entropy_model=a16)
    assert "not this run's patcher" not in capsys.readouterr().out


def test_precomputed_patching_refuses_another_entropy_model(tmp_path):
    """Data prepared with A, --entropy-model B: the exported BLT would patch unlike its training."""
    from bltkit.data import DataConfig, prepare

    a, b = _entropy_dir(tmp_path / "a", 0, max_seqlen=64), _entropy_dir(tmp_path / "b", 1, max_seqlen=64)
    (tmp_path / "text.txt").write_text("It is a truth universally acknowledged. " * 20)
    prep = tmp_path / "prep"
    prepare(DataConfig(paths=[str(tmp_path / "text.txt")], seq_len=64), a, prep)
    tokens = [*BASE, "model.patcher.mode=entropy", "train.patching=precomputed"]
    with pytest.raises(ValueError, match=re.escape(f"entropy model {b} is not the one {prep} was prepared with ({a}, ")):
        resolve_config("tiny", [str(prep)], None, tokens, entropy_model=b)
    assert resolve_config("tiny", [str(prep)], None, tokens, entropy_model=a).model.entropy_model.max_seqlen == 64
    assert resolve_config("tiny", [str(prep)], None, tokens).model.entropy_model  # prepare.json's model
    # a copy of another patcher left in the run directory by an attempt without checkpoints is not
    # taken for the run's own: a fresh start uses prepare.json's
    stale = tmp_path / "run"
    shutil.copytree(b, stale / "entropy_model")
    assert resolve_config("tiny", [str(prep)], None, tokens, run_dir=stale).model.entropy_model


def test_relative_paths_are_stored_absolute(corpus, tmp_path, monkeypatch):
    """config.json holds absolute local paths (hf: specs as they are), so a run resumes from any
    directory; a saved relative path (older runs) that is not there says what it is relative to."""
    start = tmp_path / "start"
    start.mkdir()
    shutil.copy(corpus, start / "data.txt")
    monkeypatch.chdir(start)
    cfg = resolve_config("tiny", ["data.txt", "hf:some/dataset"], None, BASE)
    assert cfg.data.paths == [str(start / "data.txt"), "hf:some/dataset"]
    cfg = resolve_config("tiny", None, None, [*BASE, "data.paths=[data.txt]"])
    assert cfg.data.paths == [str(start / "data.txt")]
    run = tmp_path / "run"
    run.mkdir()
    old = cfg.to_dict()
    old["data"]["paths"] = ["data.txt"]
    (run / "config.json").write_text(json.dumps(old))
    assert resolve_config(None, None, None, [], run_dir=run).data.paths == ["data.txt"]  # from where it started
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=re.escape(f"data.paths 'data.txt' in {run / 'config.json'} is relative to the "
                                                   "directory the run was started in")):
        resolve_config(None, None, None, [], run_dir=run)


def test_wrong_model_directories_are_named(corpus, tmp_path):
    """A run directory where its model belongs, and a BLT that carries no entropy model."""
    from bltkit.checkpoint import init_model, save_model

    space = resolve_config("tiny", [str(corpus)], None, BASE).model  # static patching: no entropy model
    blt = save_model(init_model(space), tmp_path / "blt")
    tokens = [*BASE, "model.patcher.mode=entropy"]
    with pytest.raises(ValueError, match=re.escape(f"{blt} is a BLT without an entropy model (patcher.mode 'static')")):
        resolve_config("tiny", [str(corpus)], None, tokens, entropy_model=blt)
    ent_run = tmp_path / "ent_run"
    ent_run.mkdir()
    (ent_run / "config.json").write_text(json.dumps(resolve_config("entropy-tiny", [str(corpus)], None, []).to_dict()))
    with pytest.raises(ValueError, match=re.escape(f"{ent_run} is a training run directory; its model is {ent_run / 'model'}")):
        resolve_config("tiny", [str(corpus)], None, tokens, entropy_model=ent_run)
    with pytest.raises(ValueError, match=re.escape(f"init_from={ent_run}: {ent_run} is a training run directory")):
        resolve_config(None, [str(corpus)], None, [*tokens, f"train.init_from={ent_run}"])


def test_config_file_and_override_mistakes_name_their_source(corpus, tmp_path):
    bad = tmp_path / "bad.toml"
    for text, message in (("[train\nsteps = 3\n", " is not valid TOML: Expected"),
                          ("[trian]\nsteps = 3\n", ": unknown table [trian] (did you mean [train]?)"),
                          ("steps = 3\n", ": steps = ... is outside a table"),
                          ("[train]\nstepz = 3\n", ": unknown config key 'train.stepz' (did you mean")):
        bad.write_text(text)
        with pytest.raises(ValueError, match=re.escape(f"--config {bad}{message}")):
            resolve_config("tiny", [str(corpus)], str(bad), BASE)
    with pytest.raises(ValueError, match=r"override 'train.steps' has no '=': an override is key=value"):
        resolve_config("tiny", [str(corpus)], None, [*BASE, "train.steps"])
    with pytest.raises(ValueError, match=r"has no '=': .* a data file or folder goes after --data"):
        resolve_config("tiny", [str(corpus)], None, [*BASE, str(corpus)])


# -- fine-tuning (train.init_from / --init-from) -------------------------------------------------


def test_init_from_fine_tunes_a_model_directory(corpus, tmp_path, baseline):
    from safetensors.torch import load_file

    src = baseline[0] / "model"

    def run(out, *tokens):
        cfg = resolve_config(None, [str(corpus)], None, [*BASE, f"train.init_from={src}", *tokens], run_dir=out)
        train(cfg, out, argv=["test"])
        return _rows(out)

    # a vanishing learning rate leaves the loaded weights as they are: the export is the source, bit for bit
    run(tmp_path / "still", "train.steps=1", "optim.lr=1e-30")
    a, b = load_file(str(src / WEIGHTS)), load_file(str(tmp_path / "still" / "model" / WEIGHTS))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the first batch is the one the source saw first: its loss starts where 12 steps left it
    first = _losses(run(tmp_path / "ft", "train.steps=2"))[1]
    assert first < _losses(baseline[1])[1] - 0.5
    with pytest.raises(ValueError, match="--preset or --init-from"):
        resolve_config("tiny", [str(corpus)], None, [*BASE, f"train.init_from={src}"])
    with pytest.raises(ValueError, match="not a bltkit model directory"):
        resolve_config(None, [str(corpus)], None, [*BASE, f"train.init_from={tmp_path}"])
    with pytest.raises(CheckpointError, match=r"do not fit this run's model config .* unexpected"):
        run(tmp_path / "shallow", "train.steps=1", "model.global_transformer.n_layers=1")


def test_init_from_bundled_cli(tmp_path, corpus):
    """`--init-from bundled`: the shipped model and its own entropy model patch, no preset needed."""
    out = tmp_path / "ft"
    cli_main(["train", "--init-from", "bundled", "--data", str(corpus), "--out", str(out), "train.steps=1",
              "train.seq_len=128", "train.batch_size=2", "train.eval_batches=0", "train.device=cpu"])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["train"]["init_from"] == "bundled"
    assert cfg["model"]["patcher"]["mode"] == "entropy"
    assert (out / "entropy_model").is_dir()
    assert _rows(out)[0]["loss"] < 2.0  # a random BLT starts near ln(260) = 5.56


# -- configs, schedules, CLI ----------------------------------------------------------------------


def test_overrides_and_unknown_keys(corpus):
    cfg = resolve_config("tiny", [str(corpus)], None, ["optim.lr=1e-3", "train.steps=7",
                                                       "model.global_transformer.n_layers=3",
                                                       "model.patcher.mode=space"])
    assert (cfg.optim.lr, cfg.train.steps, cfg.model.global_transformer.n_layers) == (1e-3, 7, 3)
    assert cfg.model.entropy_model is None  # unused by space patching, so not built or exported
    assert cfg.data.seq_len == cfg.train.seq_len
    assert cfg.data.paths == [str(corpus)]
    ent = resolve_config("entropy-tiny", [str(corpus)], None, ["model.dim=64"])
    assert ent.model.dim == 64
    assert not ent.is_blt
    with pytest.raises(ValueError, match=r"did you mean 'optim\.lr'"):
        resolve_config("tiny", [str(corpus)], None, ["optim.lrr=1e-3"])
    with pytest.raises(ValueError, match=r"did you mean 'train\.steps'"):
        resolve_config("tiny", [str(corpus)], None, ["steps=5"])
    with pytest.raises(ValueError, match=r"model\.global_transformer\.n_layers"):
        resolve_config("tiny", [str(corpus)], None, ["model.global_transformer.n_layer=2"])
    with pytest.raises(ValueError, match="--entropy-model"):
        resolve_config("tiny", [str(corpus)], None, [])  # entropy patching needs a patcher
    # a row can make seq_len + 1 one-byte patches: refused at the start, not at the row that does it
    too_many = ["model.patcher.mode=space", "train.seq_len=512", "model.max_patches=512"]
    with pytest.raises(ValueError, match=r"up to 513 patches .* set model\.max_patches=513"):
        resolve_config("tiny", [str(corpus)], None, too_many)
    assert resolve_config("tiny", [str(corpus)], None, [*too_many[:2], "model.max_patches=513"])
    packed = resolve_config("tiny", [str(corpus)], None, ["model.patcher.mode=space", "train.pack_global=false"])
    assert packed.train.pack_global is False
    with pytest.raises(ValueError, match="true/false"):
        resolve_config("tiny", [str(corpus)], None, ["model.patcher.mode=space", "train.pack_global=maybe"])


def test_toml_precedence(corpus, tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('preset = "entropy-tiny"\n[optim]\nlr = 2e-3\nbetas = [0.9, 0.99]\n'
                    '[train]\nsteps = 9\ncompile = false\n[model]\nn_layers = 3\n')
    cfg = resolve_config(None, [str(corpus)], str(toml), ["train.steps=11"])
    assert not cfg.is_blt
    assert cfg.model.n_layers == 3
    assert cfg.optim.lr == 2e-3
    assert cfg.optim.betas == [0.9, 0.99]
    assert cfg.train.steps == 11  # command line over file
    assert resolve_config("entropy-tiny", [str(corpus)], None, []).optim.lr == 3e-4  # preset default


def test_run_config_round_trip(corpus):
    cfg = resolve_config("tiny", [str(corpus)], None, ["model.patcher.mode=byte", "optim.schedule=wsd"])
    assert train_mod.RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_lr_schedules_and_groups():
    cos = OptimConfig(warmup=10, min_lr_ratio=0.1)
    assert lr_factor(0, 100, cos) == pytest.approx(0.1)
    assert lr_factor(9, 100, cos) == 1.0
    assert lr_factor(10, 100, cos) == 1.0
    assert lr_factor(99, 100, cos) == pytest.approx(0.1, abs=1e-3)
    assert OptimConfig().warmup_steps(30) == 3
    assert OptimConfig().warmup_steps(10**6) == 2000
    wsd = OptimConfig(warmup=10, schedule="wsd", decay_fraction=0.2, min_lr_ratio=0.0)
    assert lr_factor(79, 100, wsd) == 1.0
    assert lr_factor(89, 100, wsd) == pytest.approx(0.5)
    assert lr_factor(99, 100, wsd) == 0.0
    model = torch.nn.Sequential(torch.nn.Embedding(5, 4), torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    assert len(param_groups(model, 0.1)) == 1  # Meta: decay on everything
    decay, keep = param_groups(model, 0.1, decay_norms_and_embeddings=False)
    assert len(decay["params"]) == 1
    assert len(keep["params"]) == 4
    assert keep["weight_decay"] == 0.0


@pytest.mark.parametrize("max_norm", [1.0, 1e9])  # clipped, and a norm under the limit
def test_clip_and_step_equals_clip_grad_norm_then_step(max_norm):
    """The fused AdamW takes the clip as its grad_scale: the same norm, the same parameters within
    an ulp of fp32 (x / (1/c) for x * c) over steps, gradients left clipped as clip_grad_norm_
    leaves them; no grad_scale stays behind. A non-fused optimizer runs the two calls as they are."""
    torch.manual_seed(0)
    init = [torch.randn(300), torch.randn(7, 11)]
    runs = {}
    for name, fused in (("fused", True), ("plain", True), ("foreach", False)):
        params = [torch.nn.Parameter(t.clone()) for t in init]
        opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, fused=fused, foreach=None if fused else True)
        gen = torch.Generator().manual_seed(1)
        norms = []
        for _ in range(4):
            for p in params:
                p.grad = 5 * torch.randn(p.shape, generator=gen)
            if name == "plain":
                norms.append(torch.nn.utils.clip_grad_norm_(params, max_norm))
                opt.step()
            else:
                norms.append(clip_and_step(opt, params, max_norm))
            assert not hasattr(opt, "grad_scale")
        runs[name] = (torch.stack(norms), [p.detach().clone() for p in params], [p.grad.clone() for p in params])
    (n_f, p_f, g_f), (n_p, p_p, g_p), (n_e, p_e, g_e) = runs["fused"], runs["plain"], runs["foreach"]
    assert torch.equal(n_f, n_p)
    assert torch.equal(n_e, n_p)
    assert (n_p > max_norm).all() == (max_norm == 1.0)
    for a, b in zip(p_f, p_p, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=4 * torch.finfo(torch.float32).eps)
    for a, b in zip(g_f, g_p, strict=True):
        torch.testing.assert_close(a, b, rtol=2 * torch.finfo(torch.float32).eps, atol=0)
    for a, b in zip(p_e, p_p, strict=True):  # foreach AdamW: clip_grad_norm_ then step, as given
        torch.testing.assert_close(a, b, rtol=0, atol=4 * torch.finfo(torch.float32).eps)
    assert all(torch.equal(a, b) for a, b in zip(g_e, g_p, strict=True))  # the same clip_grad_norm_


def test_log_line_has_fixed_columns():
    full = {"step": 12, "loss": 0.812, "bpb": 1.171, "lr": 3e-4, "grad_norm": 0.41, "bytes_per_s": 1.93e6,
            "mean_patch_len": 4.4, "mfu": 0.382, "mem_gb": 61.2, "step_ms": 412.0, "eta_s": 11520.0}
    line = format_line(full, 50000)
    assert line == ("step    12/50000 | loss  0.812 | bpb  1.171 | lr 3.0e-04 | gnorm  0.41 | bytes/s  1.93M | "
                    "patch_len  4.4 | mfu 38.2% | mem  61.2G |   412ms | eta  3h12m")
    cpu = format_line({**full, "mfu": None, "mem_gb": None, "loss": 12.5}, 50000)
    assert [len(c) for c in cpu.split("|")] == [len(c) for c in line.split("|")]


def test_train_help(capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--preset", "--data", "--out", "--entropy-model", "--resume", "--config", "key=value"):
        assert flag in out
