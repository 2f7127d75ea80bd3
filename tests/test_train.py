import csv
import json
import os
import signal

import pytest
import torch

import train
from common.model import build_model

FLAGS = ["--epochs", "2", "--batch-size", "20", "--precision", "32-true", "--accelerator", "cpu"]


def run_args(tiny_folder, out, *extra):
    return ["--data", str(tiny_folder), *FLAGS, "--out", str(out), *extra]


def weights(path):
    return torch.load(path, weights_only=True)["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_training_lowers_the_loss(tmp_path, tiny_folder):
    assert train.main(["--data", str(tiny_folder), "--epochs", "4", "--batch-size", "20",
                       "--accelerator", "cpu", "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    losses = [float(r["train_loss"]) for r in rows]
    assert len(rows) == 4
    assert losses[-1] < 0.7 * losses[0], losses
    assert float(rows[-1]["monitor_acc"]) > 0.3  # chance is 0.1; the colour decides the class


def test_checkpoint_is_plain_and_clean(trained_run):
    state = torch.load(trained_run / "last.pt", weights_only=True)
    assert state["model"].keys() == build_model().state_dict().keys()
    for key in ("optimizer", "scheduler", "epoch", "step", "rng", "config", "classes", "mean", "std",
                "history", "argv", "versions", "git_commit"):
        assert key in state, key
    assert state["epoch"] == 2 and state["step"] == 0 and len(state["history"]) == 2
    assert state["config"]["batch_size"] == 20 and state["config"]["precision"] == "32-true"
    assert len(state["classes"]) == 10 and len(state["mean"]) == 3
    best = torch.load(trained_run / "best.pt", weights_only=True)
    assert_same_weights(best["model"], state["model"])  # no --val-split: best.pt = final weights


def test_run_writes_metrics_curves_and_summary(trained_run):
    rows = list(csv.DictReader(open(trained_run / "metrics.csv")))
    assert list(rows[0]) == ["epoch", "train_loss", "train_acc", "monitor_loss", "monitor_acc",
                             "lr", "epoch_s", "img_per_s"]
    assert [r["epoch"] for r in rows] == ["1", "2"]
    summary = json.loads((trained_run / "summary.json").read_text())
    assert summary["epochs"] == 2 and "final weights" in summary["best_rule"]
    for name in ("best.pt", "last.pt", "metrics.csv", "curves.png", "summary.json"):
        assert (trained_run / name).stat().st_size > 0
        assert str(trained_run / name) in summary["files"]


def test_one_cycle_rises_then_falls():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = train.one_cycle(opt, 0.4, total_steps=100)
    lrs = []
    for _ in range(100):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    peak = lrs.index(max(lrs))
    assert max(lrs) == pytest.approx(0.4) and 20 <= peak <= 26
    assert lrs[0] == pytest.approx(0.02)
    assert all(a <= b for a, b in zip(lrs[:peak], lrs[1:peak + 1]))
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1:]))
    assert lrs[-1] < 0.001


def test_resume_after_epoch_one_is_exact(tmp_path, tiny_folder, trained_run, monkeypatch):
    """A run stopped after epoch 1 and resumed ends with the same weights, bit for bit."""
    kept = {}
    real_save = train.save_checkpoint

    def save_and_keep(state, path):
        real_save(state, path)
        if path.name == "last.pt" and state["epoch"] == 1:
            kept["state"] = torch.load(path, weights_only=True)

    monkeypatch.setattr(train, "save_checkpoint", save_and_keep)
    assert train.main(run_args(tiny_folder, tmp_path / "a")) == 0
    monkeypatch.setattr(train, "save_checkpoint", real_save)
    (tmp_path / "b").mkdir()
    torch.save(kept["state"], tmp_path / "b" / "last.pt")  # as if the process died here
    assert train.main(["--resume", str(tmp_path / "b" / "last.pt")]) == 0
    assert_same_weights(weights(tmp_path / "b" / "last.pt"), weights(trained_run / "last.pt"))
    history = torch.load(tmp_path / "b" / "last.pt", weights_only=True)["history"]
    assert [row["epoch"] for row in history] == [1, 2]
    assert len(list(csv.DictReader(open(tmp_path / "b" / "metrics.csv")))) == 2


def test_ctrl_c_mid_epoch_saves_exactly_and_resumes(tmp_path, tiny_folder, trained_run, monkeypatch,
                                                    capsys):
    calls = {"n": 0}
    real_augment = train.augment

    def augment_then_ctrl_c(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # epoch 2, step 2 of 3
            os.kill(os.getpid(), signal.SIGINT)
        return real_augment(*args, **kwargs)

    monkeypatch.setattr(train, "augment", augment_then_ctrl_c)
    assert train.main(run_args(tiny_folder, tmp_path)) == 130
    assert "interrupted" in capsys.readouterr().out
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert (state["epoch"], state["step"]) == (1, 2)
    monkeypatch.setattr(train, "augment", real_augment)
    assert train.main(["--resume", str(tmp_path / "last.pt")]) == 0
    assert_same_weights(weights(tmp_path / "last.pt"), weights(trained_run / "last.pt"))


def test_refusals(tmp_path, tiny_folder, trained_run, capsys):
    # A finished run is never clobbered by accident.
    assert train.main(run_args(tiny_folder, trained_run)) == 2
    assert "--resume" in capsys.readouterr().err
    assert train.main(["--resume", str(tmp_path / "missing.pt")]) == 2
    assert "not found" in capsys.readouterr().err
    assert train.main(["--resume", str(trained_run / "last.pt"), "--batch-size", "10"]) == 2
    assert "conflicts" in capsys.readouterr().err
    assert train.main(["--epochs", "-1"]) == 2
    assert train.main(["--batch-size", "0"]) == 2
    assert train.main(["--precision", "fp8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 3 and "Traceback" not in err
    for flags in (["--label-smoothing", "1.5"], ["--weight-decay", "-1"], ["--ema", "1"],
                  ["--seed", "-3"], ["--precision", "16-mixed", "--accelerator", "cpu"],
                  ["--epochs", "1", "--batch-size", "60"]):  # 1 optimizer step: too few
        args = ["--data", str(tiny_folder), "--out", str(tmp_path / "x"), "--overwrite", *flags]
        assert train.main(args) == 2, flags
        err = capsys.readouterr().err
        assert err.startswith("error:") and err.count("\n") == 1, (flags, err)


def test_non_finite_loss_stops_the_run(tmp_path, tiny_folder, capsys):
    code = train.main(run_args(tiny_folder, tmp_path, "--lr", "1e30", "--overwrite"))
    assert code == 1
    assert "error: loss became non-finite at step" in capsys.readouterr().err
    assert not (tmp_path / "last.pt").exists()


def test_ema_weights_are_saved_under_their_own_key(tmp_path, tiny_folder, trained_run, capsys):
    import evaluate

    assert train.main(run_args(tiny_folder, tmp_path, "--ema", "0.5")) == 0
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert state["ema"].keys() == state["model"].keys()
    assert not torch.equal(state["ema"]["linear.weight"], state["model"]["linear.weight"])
    # The trained weights do not depend on whether an average is kept beside them.
    assert_same_weights(state["model"], weights(trained_run / "last.pt"))
    assert evaluate.main(["--ckpt", str(tmp_path / "last.pt"), "--ema", "--precision", "32-true"]) == 0
    assert evaluate.main(["--ckpt", str(trained_run / "last.pt"), "--ema", "--out", str(tmp_path)]) == 2
    assert "no EMA weights" in capsys.readouterr().err


def test_same_seed_same_weights(tmp_path, tiny_folder, trained_run):
    assert train.main(run_args(tiny_folder, tmp_path)) == 0
    assert_same_weights(weights(tmp_path / "last.pt"), weights(trained_run / "last.pt"))


def test_overwrite_clears_the_old_results(tmp_path, tiny_folder, trained_run):
    out = tmp_path / "run"
    out.mkdir()
    for name in ("last.pt", "evaluation.json", "gradcam.png", "cams.npz"):
        (out / name).write_text("from an older run")
    assert train.main(["--data", str(tiny_folder), "--epochs", "1", "--batch-size", "20",
                       "--precision", "32-true", "--out", str(out), "--overwrite"]) == 0
    assert not (out / "evaluation.json").exists() and not (out / "gradcam.png").exists()
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 1


def test_val_split_keeps_the_best_epoch_across_a_resume(tmp_path, tiny_folder):
    args = ["--data", str(tiny_folder), "--epochs", "3", "--batch-size", "20", "--val-split", "20",
            "--precision", "32-true", "--out", str(tmp_path)]
    assert train.main(args) == 0
    history = torch.load(tmp_path / "last.pt", weights_only=True)["history"]
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    accs = [row["monitor_acc"] for row in history]
    assert best["best_acc"] == max(accs) and best["epoch"] == accs.index(max(accs)) + 1
    assert best["best_rule"] == "best validation accuracy"
