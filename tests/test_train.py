import csv
import json
import math
import shutil

import pytest
import torch

import train
from common.model import build_model
from common.options import UsageError


def weights(path):
    return torch.load(path, weights_only=True)["model"]


def test_training_lowers_the_loss(tmp_path, tiny_folder):
    args = ["--data", str(tiny_folder), "--epochs", "4", "--batch-size", "20", "--accelerator", "cpu"]
    assert train.main([*args, "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    losses = [float(r["train_loss"]) for r in rows]
    assert len(rows) == 4
    assert losses[-1] < 0.7 * losses[0], losses
    assert float(rows[-1]["monitor_acc"]) > 0.3  # chance is 0.1; the colour decides the class


def test_checkpoint_is_plain_and_clean(trained_run, same_weights):
    state = torch.load(trained_run / "last.pt", weights_only=True)
    assert state["model"].keys() == build_model().state_dict().keys()
    for key in (
        "optimizer",
        "scheduler",
        "epoch",
        "step",
        "rng",
        "config",
        "classes",
        "mean",
        "std",
        "history",
        "argv",
        "versions",
        "git_commit",
    ):
        assert key in state, key
    assert state["epoch"] == 2 and state["step"] == 0 and len(state["history"]) == 2
    assert state["config"]["batch_size"] == 20 and state["config"]["precision"] == "32-true"
    assert len(state["classes"]) == 10 and len(state["mean"]) == 3
    best = torch.load(trained_run / "best.pt", weights_only=True)
    same_weights(best["model"], state["model"])  # no --val-split: best.pt = final weights


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_gpu_checkpoint_loads_on_a_machine_without_one(tmp_path):
    cuda = torch.device("cuda")
    state = {"model": {"w": torch.ones(2, device=cuda)}, "history": [{"t": torch.zeros(1, device=cuda)}]}
    train.save_checkpoint(state, tmp_path / "c.pt")
    # What a plain torch.load without map_location needs on a CPU-only machine: no cuda tags.
    loaded = torch.load(tmp_path / "c.pt", weights_only=True)
    assert loaded["model"]["w"].device.type == "cpu" and loaded["history"][0]["t"].device.type == "cpu"


def test_run_writes_metrics_curves_and_summary(trained_run):
    rows = list(csv.DictReader(open(trained_run / "metrics.csv")))
    assert list(rows[0]) == [
        "epoch",
        "train_loss",
        "train_acc",
        "monitor_loss",
        "monitor_acc",
        "lr",
        "epoch_s",
        "img_per_s",
        "score_s",
    ]
    assert [r["epoch"] for r in rows] == ["1", "2"]
    summary = json.loads((trained_run / "summary.json").read_text())
    assert summary["score_s"] == pytest.approx(sum(float(r["score_s"]) for r in rows), rel=1e-4)
    assert 0 < summary["train_s"] + summary["score_s"] < summary["total_s"]
    assert summary["epochs"] == 2 and "final weights" in summary["best_rule"]
    for name in ("best.pt", "last.pt", "metrics.csv", "curves.png", "summary.json"):
        assert (trained_run / name).stat().st_size > 0
        assert str(trained_run / name) in summary["files"]


def test_one_cycle_rises_then_falls():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.4)
    sched = train.one_cycle(opt, total_steps=100, warmup=0.25, start=1 / 20, end=1 / 4000)
    lrs = []
    for _ in range(100):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    peak = lrs.index(max(lrs))
    assert max(lrs) == pytest.approx(0.4) and 20 <= peak <= 26
    assert lrs[0] == pytest.approx(0.02)
    assert all(a <= b for a, b in zip(lrs[:peak], lrs[1 : peak + 1]))
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1 :]))
    assert lrs[-1] < 0.001


@pytest.mark.parametrize(
    "scale, decay_norms, groups",
    [
        pytest.param(4.0, True, 2, id="4x"),
        pytest.param(64.0, True, 2, id="64x"),
        pytest.param(4.0, False, 3, id="4x-no-decay-norms"),
    ],
)
def test_norm_biases_follow_the_schedule_at_their_multiple_of_the_lr(scale, decay_norms, groups):
    """--norm-bias-lr: every BatchNorm bias, and nothing else, steps at `scale` times the lr
    all along the schedule, its weight decay divided by `scale` (none with --no-decay-norms)."""
    net = build_model(10)
    config = train.TrainConfig(lr=0.2, norm_bias_lr=scale, decay_norms=decay_norms)
    opt = torch.optim.SGD(train.parameter_groups(net, config), lr=config.lr)
    sched = train.one_cycle(opt, total_steps=50, warmup=0.2, start=0.2, end=0.0)
    bn_biases = {id(m.bias) for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    is_biases = [{id(p) for p in g["params"]} == bn_biases for g in opt.param_groups]
    assert is_biases == [False] * (groups - 1) + [True]
    decay = config.weight_decay / scale if decay_norms else 0.0
    assert opt.param_groups[-1]["weight_decay"] == pytest.approx(decay)
    for _ in range(50):
        lrs = sched.get_last_lr()
        assert lrs[-1] == pytest.approx(scale * lrs[0])
        opt.step()
        sched.step()


@pytest.mark.parametrize(
    "recipe",
    [
        pytest.param([], id="default"),
        pytest.param(["--norm-bias-lr", "1"], id="norm-biases-at-the-lr"),
        # 6 steps an epoch: epoch 1 ends after a sync, off the slow weights that last.pt keeps
        pytest.param(["--lookahead", "--batch-size", "10"], id="lookahead"),
    ],
)
def test_resume_after_epoch_one_is_exact(
    tmp_path, tiny_folder, train_flags, same_weights, monkeypatch, recipe
):
    """A run stopped after epoch 1 and resumed ends with the same weights, bit for bit, as the
    run that went on."""
    kept = {}
    real_save = train.save_checkpoint

    def save_and_keep(state, path):
        real_save(state, path)
        if path.name == "last.pt" and state["epoch"] == 1:
            kept["state"] = torch.load(path, weights_only=True)

    monkeypatch.setattr(train, "save_checkpoint", save_and_keep)
    assert train.main(["--data", str(tiny_folder), *train_flags, *recipe, "--out", str(tmp_path / "a")]) == 0
    monkeypatch.setattr(train, "save_checkpoint", real_save)
    (tmp_path / "b").mkdir()
    torch.save(kept["state"], tmp_path / "b" / "last.pt")  # as if the process died here
    assert train.main(["--resume", str(tmp_path / "b" / "last.pt")]) == 0
    same_weights(weights(tmp_path / "b" / "last.pt"), weights(tmp_path / "a" / "last.pt"))
    history = torch.load(tmp_path / "b" / "last.pt", weights_only=True)["history"]
    assert [row["epoch"] for row in history] == [1, 2]
    assert len(list(csv.DictReader(open(tmp_path / "b" / "metrics.csv")))) == 2


def test_ctrl_c_mid_epoch_saves_exactly_and_resumes(
    tmp_path, tiny_folder, trained_run, train_flags, same_weights, ctrl_c_at, monkeypatch, capsys
):
    ctrl_c_at(5)  # epoch 2, step 2 of 3
    assert train.main(["--data", str(tiny_folder), *train_flags, "--out", str(tmp_path)]) == 130
    assert "interrupted" in capsys.readouterr().out
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert (state["epoch"], state["step"]) == (1, 2)
    monkeypatch.undo()
    assert train.main(["--resume", str(tmp_path / "last.pt")]) == 0
    same_weights(weights(tmp_path / "last.pt"), weights(trained_run / "last.pt"))


@pytest.mark.parametrize(
    "flags, says",
    [
        pytest.param(["--epochs", "-1"], "--epochs", id="negative-epochs"),
        pytest.param(["--batch-size", "0"], "--batch-size", id="zero-batch"),
        pytest.param(["--precision", "fp8"], "--precision", id="unknown-precision"),
        pytest.param(["--label-smoothing", "1.5"], "--label-smoothing", id="label-smoothing-above-1"),
        pytest.param(["--weight-decay", "-1"], "--weight-decay", id="negative-weight-decay"),
        pytest.param(["--ema", "1"], "--ema", id="ema-decay-1"),
        pytest.param(["--norm-bias-lr", "0"], "--norm-bias-lr", id="zero-norm-bias-lr"),
        pytest.param(["--norm-bias-lr", "inf"], "--norm-bias-lr", id="infinite-norm-bias-lr"),
        pytest.param(["--flip", "sideways"], "--flip", id="unknown-flip"),
        pytest.param(["--crop-pad", "-2"], "--crop-pad", id="negative-crop-pad"),
        pytest.param(["--padding", "reflect", "--crop-pad", "32"], "--crop-pad 32", id="reflect-too-wide"),
        pytest.param(["--seed", "-3"], "--seed", id="negative-seed"),
        pytest.param(["--precision", "16-mixed", "--accelerator", "cpu"], "16-mixed", id="fp16-on-cpu"),
        pytest.param(["--epochs", "1", "--batch-size", "60"], "optimizer step", id="one-step-in-all"),
    ],
)
def test_bad_settings_are_one_line(tmp_path, tiny_folder, flags, says, one_line_error, capsys):
    args = ["--data", str(tiny_folder), "--out", str(tmp_path / "x"), "--overwrite", *flags]
    assert train.main(args) == 2
    err = capsys.readouterr().err
    one_line_error(err, says)
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "args, says",
    [
        pytest.param(
            lambda run, tmp: ["--resume", str(tmp / "missing.pt")], "not found", id="missing-resume-file"
        ),
        pytest.param(
            lambda run, tmp: ["--resume", str(run / "last.pt"), "--batch-size", "10"],
            "conflicts",
            id="resume-conflict",
        ),
    ],
)
def test_resume_refusals(tmp_path, trained_run, args, says, one_line_error, capsys):
    assert train.main(args(trained_run, tmp_path)) == 2
    err = capsys.readouterr().err
    one_line_error(err, says)


def test_non_finite_loss_stops_the_run(tmp_path, tiny_folder, train_flags, capsys):
    code = train.main(["--data", str(tiny_folder), *train_flags, "--out", str(tmp_path), "--lr", "1e30"])
    assert code == 1
    assert "error: loss became non-finite at step" in capsys.readouterr().err
    assert not (tmp_path / "last.pt").exists()


def test_lookahead_pulls_the_weights_back_every_5_steps_and_at_the_last():
    """The trained weights (stood in for by +1 a step) move freely between syncs; at a sync
    the slow copy moves 1 - decay of the way to them and they restart from it. BatchNorm's
    float statistics take part, its step counter does not."""
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1), torch.nn.BatchNorm2d(1))
    start = {k: v.clone() for k, v in net.state_dict().items()}
    lookahead = train.Lookahead(net, total_steps=12)
    assert lookahead.decay_at(0) == 0 and lookahead.decay_at(12) == pytest.approx(0.95**5)
    slow = fast = 0.0  # offsets from the start, the same for every float tensor
    for step in range(1, 13):
        with torch.no_grad():
            for t in train.float_state(net).values():
                t.add_(1)
        fast += 1
        lookahead.update(net, step)
        if step in (5, 10, 12):
            slow += (1 - lookahead.decay_at(step)) * (fast - slow)
            fast = slow
        for name, t in net.state_dict().items():
            if t.is_floating_point():
                torch.testing.assert_close(t, start[name] + fast, msg=f"{name} after step {step}")
            else:
                assert torch.equal(t, start[name])
    assert 0 < fast < 12  # the run ends on the slow weights, short of the last fast ones


def test_whitened_stem_sees_each_principal_direction_of_the_patches_at_unit_variance():
    """--whiten-stem: over the images it was measured on, the stem's first 27 channels (one per
    dimension of a 3x3x3 patch) are uncorrelated at unit variance, largest direction first,
    the next 27 are their negatives, and the last 10 filters keep their random start."""
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(40, 3, 36, 36, generator=g)
    images = torch.nn.functional.avg_pool2d(noise, 5, stride=1)  # 32x32, neighbouring pixels correlated
    images = images + 0.5 * images.mean(1, keepdim=True)  # and the channels too
    conv = torch.nn.Conv2d(3, 64, 3, bias=False)  # no padding: the patches the init measured
    rest = conv.weight[54:].clone()
    train.whiten_stem(conv, images, eps=0.0)
    with torch.no_grad():
        out = conv(images).transpose(0, 1).flatten(1).double()
    moment = out[:27] @ out[:27].T / out.shape[1]
    torch.testing.assert_close(moment, torch.eye(27, dtype=torch.float64), atol=2e-3, rtol=0)
    torch.testing.assert_close(out[27:54], -out[:27])
    assert torch.equal(conv.weight[54:], rest)
    norms = conv.weight[:27].flatten(1).norm(dim=1)
    assert norms[0] < norms[26]  # the largest direction first: it needs the smallest filter


def test_ema_weights_are_saved_under_their_own_key(
    tmp_path, tiny_folder, trained_run, train_flags, same_weights, capsys
):
    import evaluate

    assert train.main(["--data", str(tiny_folder), *train_flags, "--out", str(tmp_path), "--ema", "0.5"]) == 0
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert state["ema"].keys() == state["model"].keys()
    assert not torch.equal(state["ema"]["linear.weight"], state["model"]["linear.weight"])
    # The trained weights do not depend on whether an average is kept beside them.
    same_weights(state["model"], weights(trained_run / "last.pt"))
    assert state["scored"] == "ema"
    # evaluate.py uses by default the weights the run scored: the average.
    for which in ("scored", "ema", "trained"):
        args = ["--ckpt", str(tmp_path / "last.pt"), "--weights", which, "--precision", "32-true"]
        assert evaluate.main([*args, "--out", str(tmp_path / which)]) == 0
    predictions = {w: (tmp_path / w / "predictions.csv").read_text() for w in ("scored", "ema", "trained")}
    assert predictions["scored"] == predictions["ema"] != predictions["trained"]
    assert evaluate.main(["--ckpt", str(trained_run / "last.pt"), "--ema", "--out", str(tmp_path)]) == 2
    assert "no EMA weights" in capsys.readouterr().err


def test_same_seed_same_weights(tmp_path, tiny_folder, trained_run, train_flags, same_weights):
    assert train.main(["--data", str(tiny_folder), *train_flags, "--out", str(tmp_path)]) == 0
    same_weights(weights(tmp_path / "last.pt"), weights(trained_run / "last.pt"))


def test_overwrite_clears_the_old_results(tmp_path, tiny_folder, train_flags):
    out = tmp_path / "run"
    out.mkdir()
    for name in ("last.pt", "evaluation.json", "gradcam.png", "cams.npz"):
        (out / name).write_text("from an older run")
    args = ["--data", str(tiny_folder), *train_flags, "--epochs", "1", "--out", str(out), "--overwrite"]
    assert train.main(args) == 0
    assert not (out / "evaluation.json").exists() and not (out / "gradcam.png").exists()
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 1


@pytest.mark.parametrize(
    "flags, says",
    [
        pytest.param(["--data", "/nowhere"], "not found", id="missing-data"),
        pytest.param(["--epochs", "1", "--batch-size", "60"], "optimizer step", id="one-step-in-all"),
    ],
)
def test_a_refused_overwrite_deletes_nothing(tmp_path, tiny_folder, flags, says, one_line_error, capsys):
    out = tmp_path / "run"
    out.mkdir()
    for name in ("last.pt", "best.pt", "metrics.csv"):
        (out / name).write_text("a good run")
    assert train.main(["--data", str(tiny_folder), "--out", str(out), "--overwrite", *flags]) == 2
    one_line_error(capsys.readouterr().err, says)
    assert all((out / name).read_text() == "a good run" for name in ("last.pt", "best.pt", "metrics.csv"))


@pytest.mark.parametrize(
    "epochs_done, summary, says",
    [
        pytest.param(2, True, ["holds a finished run (2 epochs)", "--overwrite"], id="finished"),
        pytest.param(
            2, False, ["epochs are done but not its final writes", "pass --resume '"], id="final-writes"
        ),
        pytest.param(1, False, ["pass --resume '", "(at epoch 2 of 2)"], id="unfinished"),
    ],
)
def test_a_folder_holding_a_run_says_what_to_do(
    tmp_path, tiny_folder, trained_run, epochs_done, summary, says, one_line_error, capsys
):
    """The command it suggests can be pasted into a shell: the folder's name has a space."""
    out = tmp_path / "my run"
    out.mkdir()
    state = torch.load(trained_run / "last.pt", weights_only=True)
    state["epoch"] = epochs_done
    torch.save(state, out / "last.pt")
    if summary:
        shutil.copy(trained_run / "summary.json", out)
    before = (out / "last.pt").read_bytes()
    assert train.main(["--data", str(tiny_folder), "--out", str(out)]) == 2
    one_line_error(capsys.readouterr().err, f"{out / 'last.pt'} exists", *says)
    assert (out / "last.pt").read_bytes() == before  # never clobbered


def test_resume_from_an_earlier_checkpoint_never_trains_over_a_later_one(
    tmp_path, val_split_run, one_line_error, capsys
):
    """best.pt is epoch 2 of 3 there: resumed into its own folder it would retrain epoch 3 over
    last.pt."""
    run = shutil.copytree(val_split_run, tmp_path / "run")
    before = (run / "last.pt").read_bytes()
    assert train.main(["--resume", str(run / "best.pt")]) == 2
    one_line_error(capsys.readouterr().err, "is further on", f"resume {run / 'last.pt'}")
    assert (run / "last.pt").read_bytes() == before


def test_resume_into_a_folder_holding_another_run_is_refused(tmp_path, trained_run, one_line_error, capsys):
    other = tmp_path / "other"
    other.mkdir()
    (other / "last.pt").write_text("another run")
    assert train.main(["--resume", str(trained_run / "last.pt"), "--out", str(other)]) == 2
    one_line_error(capsys.readouterr().err, "holds another run", "new --out")
    assert (other / "last.pt").read_text() == "another run"


def test_a_resumed_run_normalises_with_its_checkpoints_statistics(tmp_path, trained_run):
    """Checkpoints from before the statistics were measured hold CIFAR-10's published ones:
    the resumed epochs must go on with them."""
    state = torch.load(trained_run / "last.pt", weights_only=True)
    published = ([0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616])
    state["mean"], state["std"] = published
    state["config"]["epochs"] = 3  # one more epoch to run
    (tmp_path / "run").mkdir()
    torch.save(state, tmp_path / "run" / "last.pt")
    assert train.main(["--resume", str(tmp_path / "run" / "last.pt")]) == 0
    resumed = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert resumed["epoch"] == 3 and (resumed["mean"], resumed["std"]) == published


def test_val_split_keeps_the_best_epoch(val_split_run):
    """With --val-split, best.pt holds the epoch with the best validation accuracy (the
    second of three here), not the last."""
    best = torch.load(val_split_run / "best.pt", weights_only=True)
    last = torch.load(val_split_run / "last.pt", weights_only=True)
    assert best["epoch"] == 2 and best["best_acc"] == 0.9 and last["epoch"] == 3
    assert best["best_rule"] == "best validation accuracy"
    assert not torch.equal(best["model"]["linear.weight"], last["model"]["linear.weight"])
    assert "temperature" in best and "temperature" not in last  # calibrated: the weights it keeps


@pytest.mark.parametrize(
    "n_train, world, batch",
    [
        pytest.param(50_000, 1, train.BATCH, id="full-data-keeps-the-tuned-batch"),
        pytest.param(2_000, 1, 32, id="smoke-run-2000-images"),
        pytest.param(60, 1, 16, id="tiny-set-stops-at-16"),
        pytest.param(60, 2, 32, id="two-processes-keep-16-each"),
    ],
)
def test_default_batch_leaves_enough_steps(n_train, world, batch):
    chosen, why = train.batch_for(n_train, world)
    assert chosen == batch and chosen % world == 0
    assert (why == "") == (batch == train.BATCH)
    if batch != train.BATCH:
        assert f"{math.ceil(n_train / batch)} steps" in why


def test_more_processes_than_the_default_batch_must_name_a_batch():
    with pytest.raises(UsageError, match="does not split over 200 processes: pass --batch-size"):
        train.batch_for(50_000, 200)


@pytest.mark.parametrize(
    "batch, factor",
    [
        pytest.param(train.BATCH, 1.0, id="the-tuned-batch-keeps-the-tuned-lr"),
        pytest.param(train.BATCH // 4, 0.5, id="a-quarter-of-the-batch-half-the-lr"),
        pytest.param(train.BATCH * 4, 2.0, id="four-times-the-batch-twice-the-lr"),
    ],
)
def test_default_lr_follows_the_square_root_of_the_batch(batch, factor):
    assert train.default_lr(batch) == pytest.approx(train.LR_PER_BATCH * factor)


@pytest.mark.parametrize("n_train", [50_000, 6_272, 2_000])
@pytest.mark.parametrize("asked", [None, 3])
def test_the_set_size_leaves_the_crop_padding_alone(n_train, asked):
    """2 px learned more than 4 px on the mean at 2,000, 4,000, 8,000 and 50,000 images
    (benchmarks/recipes.md): one padding at every size, unless the user picks one."""
    given = {} if asked is None else {"crop_pad": asked}
    config, why = train.TrainConfig(**given).for_data(n_train, world=1)
    assert config.crop_pad == (train.TrainConfig().crop_pad if asked is None else asked)
    assert "pad" not in why


def test_a_small_run_says_what_it_chose_and_stores_it(tmp_path, tiny_folder, capsys):
    args = ["--data", str(tiny_folder), "--epochs", "1", "--precision", "32-true", "--out", str(tmp_path)]
    assert train.main(args) == 0
    out = capsys.readouterr().out
    config = torch.load(tmp_path / "last.pt", weights_only=True)["config"]
    assert config["batch_size"] == 16 and config["lr"] == pytest.approx(train.default_lr(16))
    assert config["crop_pad"] == train.TrainConfig().crop_pad
    assert "chosen    batch 16" in out and "peak lr" in out


def test_a_checkpoint_from_before_the_restructuring_resumes(
    tmp_path, tiny_folder, train_flags, ctrl_c_at, monkeypatch
):
    """last.pt as the earlier train.py wrote it: a OneCycleLR schedule, the epoch's running sums
    as a list, a config without the newer settings, no `scored`, epochs without `score_s`."""
    ctrl_c_at(5)
    # BatchNorm biases at the lr of the rest, as every run before --norm-bias-lr
    old = ["--data", str(tiny_folder), *train_flags, "--norm-bias-lr", "1", "--out", str(tmp_path)]
    assert train.main(old) == 130
    monkeypatch.undo()
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    one_cycle = torch.optim.lr_scheduler.OneCycleLR(
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), max_lr=0.1, total_steps=6
    )
    for _ in range(state["scheduler"]["last_epoch"]):
        one_cycle.optimizer.step()
        one_cycle.step()
    partial = state["partial"]
    state.update(
        scheduler=one_cycle.state_dict(),
        partial=[partial[k] for k in ("loss", "correct", "images", "seconds")],
    )
    for key in ("warmup", "lr_start", "lr_end", "decay_norms", "norm_bias_lr", "dataset", "logger"):
        del state["config"][key]
    del state["scored"]
    assert len(state["history"]) == 1
    del state["history"][0]["score_s"]
    torch.save(state, tmp_path / "last.pt")
    assert train.main(["--resume", str(tmp_path / "last.pt")]) == 0
    resumed = torch.load(tmp_path / "last.pt", weights_only=True)
    assert resumed["epoch"] == 2 and resumed["config"]["norm_bias_lr"] == 1.0
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [r["score_s"] != "" for r in rows] == [False, True]
    assert json.loads((tmp_path / "summary.json").read_text())["score_s"] is None  # not half a sum
