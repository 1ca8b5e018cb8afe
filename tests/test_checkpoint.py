"""``ichmodel.checkpoint``: one plain dict per file, state stored once, models load without their ImageNet file."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from ichmodel import io as store
from ichmodel.checkpoint import (
    WEIGHT_KEYS,
    checkpoint_dict,
    load_checkpoint,
    load_model,
    save_checkpoint,
    sidecar_location,
)
from ichmodel.checkpoint_recovery import (
    CheckpointCorrupt,
    load_verified_checkpoint,
    newest_intact_checkpoint,
    prune_checkpoint,
    run_checkpoints,
    verify_checkpoint,
)
from ichmodel.config import Config
from ichmodel.engine import state_from_checkpoint
from ichmodel.model import build_model
from ichmodel.rng_state import capture_rng_state, restore_rng_state
from ichmodel.stages import TrainState
from tests.datagen import file_tree, moto_bucket


def _cfg(**model) -> Config:
    cfg = Config()
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **model))


def test_round_trip_is_weights_only_loadable_and_holds_the_state_once(tmp_path):
    cfg = _cfg()
    torch.manual_seed(0)
    model = build_model(cfg.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    state = TrainState(stage=1, epoch=2, global_epoch=5, best_f2=0.25, thresholds=[0.1, 0.2, 0.3, 0.4, 0.5])
    state.history.append({"global_epoch": 5.0, "val_loss": 0.5})
    ckpt = checkpoint_dict(model, cfg, state, optimizer=optimizer, best_model=model.state_dict())
    path = save_checkpoint(ckpt, tmp_path / "c.pt")
    assert path == tmp_path / "c.pt" and sorted(p.name for p in tmp_path.iterdir()) == ["c.pt", "c.pt.json"]
    record = json.loads((tmp_path / "c.pt.json").read_text())  # no temp left; the record describes the file
    assert (
        record["size"] == path.stat().st_size
        and record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    )
    assert record["file"] == "c.pt" and record["optimizer"] is True

    loaded = torch.load(path, map_location="cpu", weights_only=True)  # plain data only
    assert set(loaded) == set(WEIGHT_KEYS) | {f.name for f in dataclasses.fields(TrainState)}
    assert "state" not in loaded  # every field once, at the top level
    assert load_checkpoint(path).keys() == loaded.keys()
    assert loaded["config"] == cfg.to_dict() and loaded["scheduler"] is None
    assert (loaded["stage"], loaded["epoch"], loaded["thresholds"]) == (1, 2, [0.1, 0.2, 0.3, 0.4, 0.5])
    assert state_from_checkpoint(loaded) == state
    rebuilt, rebuilt_cfg, _ = load_model(path)
    assert rebuilt_cfg == cfg and not rebuilt.training
    for key, value in model.state_dict().items():
        torch.testing.assert_close(rebuilt.state_dict()[key], value)


def test_load_model_prefers_the_best_weights(tmp_path):
    cfg = _cfg()
    torch.manual_seed(0)
    last, best = build_model(cfg.model), build_model(cfg.model)
    path = save_checkpoint(
        checkpoint_dict(last, cfg, TrainState(), best_model=best.state_dict()), tmp_path / "c.pt"
    )
    rebuilt, _, _ = load_model(path)
    for key, value in best.state_dict().items():
        torch.testing.assert_close(rebuilt.state_dict()[key], value)
    with pytest.raises(ValueError, match="clash"):
        checkpoint_dict(last, cfg, {"model": 1})


def test_load_model_needs_no_pretrained_weights_file(tmp_path):
    """A checkpoint holds every weight: the ImageNet file its config names may be gone (FileNotFoundError before)."""
    imagenet = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), imagenet)
    cfg = _cfg(pretrained_weights=str(imagenet))
    torch.manual_seed(1)
    model = build_model(cfg.model)
    path = save_checkpoint(checkpoint_dict(model, cfg, TrainState(finished=True)), tmp_path / "c.pt")
    imagenet.unlink()

    rebuilt, saved_cfg, _ = load_model(path)
    assert saved_cfg.model.pretrained_weights == str(imagenet)  # the saved config is returned unchanged
    for key, value in model.state_dict().items():
        torch.testing.assert_close(rebuilt.state_dict()[key], value)


def test_a_checkpoint_from_before_model_prediction_keeps_predicting_with_mc(tmp_path):
    """Its thresholds were tuned on MC probabilities: it must not switch to today's default, "mc+ac"."""
    cfg = _cfg(feature_dim=32, rnn_hidden=16, cpc_steps=2)
    ckpt = checkpoint_dict(build_model(cfg.model), cfg, TrainState())
    del ckpt["config"]["model"]["prediction"]
    _, old_cfg, _ = load_model(save_checkpoint(ckpt, tmp_path / "old.pt"))
    assert old_cfg.model.prediction == "mc" and cfg.model.prediction == "mc+ac"
    _, new_cfg, _ = load_model(save_checkpoint(checkpoint_dict(build_model(cfg.model), cfg, TrainState()),
                                                tmp_path / "new.pt"))  # fmt: skip
    assert new_cfg == cfg


# ------------------------------------------------------------------------------- smaller checkpoints


def _tiny() -> tuple[Config, torch.nn.Module, torch.optim.Optimizer]:
    cfg = _cfg(feature_dim=32, rnn_hidden=16, cpc_steps=2)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()  # AdamW's moments exist
    return cfg, model, optimizer


def test_best_weights_equal_to_the_last_are_stored_once_and_old_files_still_load(tmp_path):
    cfg, model, optimizer = _tiny()
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    new = save_checkpoint(checkpoint_dict(model, cfg, TrainState(), best_model=weights), tmp_path / "new.pt")
    alone = save_checkpoint(checkpoint_dict(model, cfg, TrainState()), tmp_path / "alone.pt")
    # before: the best weights were a second copy, and no record was written beside the file
    old = tmp_path / "old.pt"
    torch.save({**checkpoint_dict(model, cfg, TrainState()), "best_model": weights}, old)
    weight_bytes = sum(v.numel() * v.element_size() for v in weights.values())
    assert new.stat().st_size - alone.stat().st_size < 0.01 * weight_bytes  # no second copy
    assert old.stat().st_size - alone.stat().st_size > 0.99 * weight_bytes
    for path in (new, old):
        loaded = load_verified_checkpoint(path)  # the old one by its zip CRCs: it has no record
        for key, value in weights.items():
            torch.testing.assert_close(loaded["best_model"][key], value)
            torch.testing.assert_close(loaded["model"][key], value)
        rebuilt, _, _ = load_model(path)
        torch.testing.assert_close(rebuilt.state_dict()["cls.weight"], weights["cls.weight"])
    assert verify_checkpoint(old).startswith("zip CRC-32") and verify_checkpoint(new) == "size and sha256"
    other = {k: v + 1 if v.is_floating_point() else v for k, v in weights.items()}
    two = save_checkpoint(checkpoint_dict(model, cfg, TrainState(), best_model=other), tmp_path / "two.pt")
    assert two.stat().st_size - alone.stat().st_size > 0.99 * weight_bytes  # different best: kept


def test_prune_drops_the_optimizer_state_and_best_only_keeps_the_exported_weights(tmp_path):
    cfg, model, optimizer = _tiny()
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max")
    best = {k: v + 1 if v.is_floating_point() else v.clone() for k, v in model.state_dict().items()}
    state = TrainState(stage=2, epoch=1, global_epoch=4, stage_started=True)
    ckpt = checkpoint_dict(model, cfg, state, optimizer=optimizer, scheduler=scheduler, best_model=best)
    path = save_checkpoint(ckpt, tmp_path / "c.pt")
    size = path.stat().st_size
    before, after = prune_checkpoint(path)
    assert before == size
    assert after < before and after == path.stat().st_size
    pruned = load_verified_checkpoint(path)  # rewritten with a new record
    assert pruned["optimizer"] is None and pruned["scheduler"] == scheduler.state_dict()
    assert state_from_checkpoint(pruned) == state
    torch.testing.assert_close(pruned["model"]["cls.weight"], model.state_dict()["cls.weight"])
    assert prune_checkpoint(path) == (after, after)  # nothing left to drop

    _, smallest = prune_checkpoint(path, best_only=True)
    assert smallest < 0.6 * after  # one set of weights instead of two
    rebuilt, _, loaded = load_model(path)
    for key, value in best.items():
        torch.testing.assert_close(rebuilt.state_dict()[key], value)
    assert loaded["scheduler"] is None and loaded["optimizer"] is None


# ------------------------------------------------------------------------------ verified checkpoints


def _run_folder(tmp_path) -> list[Path]:
    """A Ray Train run folder with three reported checkpoints (epochs 1, 2, 3), as Train names them."""
    cfg = _cfg(feature_dim=32, rnn_hidden=16, cpc_steps=2)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    paths = []
    for epoch, stamp in enumerate(
        ["2026-12-07_03-00-01.000001", "2026-12-07_03-00-09.5", "2026-12-07_03-01-00.0"]
    ):
        folder = tmp_path / "run" / f"checkpoint_{stamp}"
        paths.append(save_checkpoint(checkpoint_dict(model, cfg, TrainState(global_epoch=epoch + 1)),
                                     folder / "checkpoint.pt"))  # fmt: skip
    (tmp_path / "run" / "checkpoint_manager_snapshot.json").write_text("{}")
    return paths


def test_a_truncated_newest_checkpoint_falls_back_to_the_older_intact_one(tmp_path, caplog):
    first, second, newest = _run_folder(tmp_path)
    assert run_checkpoints(tmp_path / "run") == [str(newest), str(second), str(first)]
    assert load_verified_checkpoint(newest)["global_epoch"] == 3
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])  # a copy cut short (a full disk, a killed upload)
    with caplog.at_level(logging.WARNING, logger="ichmodel.checkpoint"):
        location, ckpt = newest_intact_checkpoint(run_checkpoints(tmp_path / "run"))
    assert location == str(second) and ckpt["global_epoch"] == 2
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping")]
    assert skipped == [f"skipping checkpoint {newest}: truncated ({len(data) // 2} of {len(data)} bytes)"]
    with pytest.raises(CheckpointCorrupt, match=r"truncated"):
        verify_checkpoint(newest)


def test_each_cause_is_named_and_no_intact_checkpoint_refuses(tmp_path, caplog):
    first, second, newest = _run_folder(tmp_path)
    flipped = bytearray(newest.read_bytes())
    flipped[len(flipped) // 2] ^= 0xFF
    newest.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointCorrupt, match=rf"^{newest}: hash mismatch"):
        verify_checkpoint(newest)
    Path(f"{second}.json").unlink()  # a file without a record (before sidecars, or cut between the writes)
    second.write_bytes(second.read_bytes()[:1000])
    with pytest.raises(CheckpointCorrupt, match=rf"^{second}: unreadable zip"):
        verify_checkpoint(second)
    first.unlink()
    with (
        caplog.at_level(logging.WARNING, logger="ichmodel.checkpoint"),
        pytest.raises(CheckpointCorrupt, match="no intact checkpoint to resume from") as raised,
    ):
        newest_intact_checkpoint([newest, second, first])
    assert (
        all(str(p) in str(raised.value) for p in (newest, second, first))
        and f"{first}: missing" in caplog.text
    )
    assert newest_intact_checkpoint([]) is None  # nothing to resume: a fresh run


@pytest.mark.slow
def test_checkpoints_on_s3_verify_and_fall_back(s3, monkeypatch, caplog):
    env, bucket = s3
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    cfg = _cfg(feature_dim=32, rnn_hidden=16, cpc_steps=2)
    model = build_model(cfg.model)
    older = save_checkpoint(
        checkpoint_dict(model, cfg, TrainState(global_epoch=1)), f"{bucket}/r/checkpoint_1/c.pt"
    )
    newer = save_checkpoint(
        checkpoint_dict(model, cfg, TrainState(global_epoch=2)), f"{bucket}/r/checkpoint_2/c.pt"
    )
    assert store.is_file(f"{newer}.json") and verify_checkpoint(newer) == "size and sha256"
    store.atomic_write_bytes(newer, store.read_bytes(newer)[:-10])  # the object replaced by a shorter one
    with caplog.at_level(logging.WARNING, logger="ichmodel.checkpoint"):
        location, ckpt = newest_intact_checkpoint(run_checkpoints(f"{bucket}/r", "c.pt"))
    assert (location, ckpt["global_epoch"]) == (
        older,
        1,
    ) and f"skipping checkpoint {newer}: truncated" in caplog.text
    fs, root = store.resolve(f"{bucket}/r")  # the (filesystem, path) form a Ray Checkpoint carries
    assert run_checkpoints(root, "c.pt", filesystem=fs)[0] == f"{root}/checkpoint_2/c.pt"
    with pytest.raises(CheckpointCorrupt, match="truncated"):
        verify_checkpoint(f"{root}/checkpoint_2/c.pt", filesystem=fs)


# -------------------------------------------------------------------------------------- random streams


def _draws(generator: torch.Generator) -> tuple:
    return (torch.rand(5).tolist(), np.random.rand(5).tolist(), np.random.randn(3).tolist(),
            [random.random() for _ in range(5)], random.gauss(0, 1), torch.rand(5, generator=generator).tolist(),
            torch.nn.functional.dropout(torch.ones(64), 0.5).tolist())  # fmt: skip


def test_rng_states_restore_every_stream_and_survive_a_weights_only_checkpoint(tmp_path):
    generator = torch.Generator().manual_seed(3)
    torch.manual_seed(1), np.random.seed(2), random.seed(4)
    _draws(generator)  # move every stream away from its seed (numpy and random now hold a cached gaussian)
    np.random.randn(1), random.gauss(0, 1)
    state = capture_rng_state({"augment": generator})
    expected = _draws(generator)
    assert _draws(generator) != expected  # the streams moved on
    restore_rng_state(state, {"augment": generator})
    assert _draws(generator) == expected

    cfg, model, _ = _tiny()
    path = save_checkpoint(checkpoint_dict(model, cfg, TrainState(), rng=state), tmp_path / "c.pt")
    loaded = torch.load(path, map_location="cpu", weights_only=True)["rng"]  # plain data only
    fresh = torch.Generator()
    restore_rng_state(loaded, {"augment": fresh})
    assert _draws(fresh) == expected
    with pytest.raises(ValueError, match="clash"):
        checkpoint_dict(model, cfg, {"rng": 1})


@pytest.fixture(scope="module")
def s3():
    """``(environment, s3://bucket)`` of a moto S3 server running for this module."""
    with moto_bucket("ich-ckpt") as env:
        yield env, "s3://ich-ckpt"


def test_a_file_that_is_no_checkpoint_or_is_cut_short_is_named_in_one_line(tmp_path):
    """torch.load's own errors are a page of advice about ``weights_only`` (any non-PyTorch file) or a miniz
    message: :func:`load_checkpoint` names the file and what is wrong with it, as a ``ValueError`` the jobs
    print in one line (``predict.py --checkpoint notes.txt``)."""
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(text))} is not a PyTorch checkpoint file$"):
        load_checkpoint(text)
    whole, cut = tmp_path / "whole.pt", tmp_path / "cut.pt"
    torch.save({"model": {"w": torch.zeros(1000)}}, whole)
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(
        ValueError, match=rf"^{re.escape(str(cut))} is cut short or damaged \(PytorchStreamReader"
    ):
        load_checkpoint(cut)
    assert load_checkpoint(whole)["model"]["w"].shape == (1000,)


def test_older_checkpoints_are_pruned_after_a_report_and_before_the_report_that_ends_the_run(tmp_path):
    """Train records a run finished at its last report; from then on the run's folder must not change (a
    fold job killed then, resumed, found a finished run's older checkpoint rewritten and a half-written
    temporary file beside it: the pruning still ran after that report). ``report`` does here what Train
    does with a report: copy the checkpoint folder into the run as its newest ``checkpoint_*`` folder."""
    import shutil

    from ray_jobs.worker import report_with_checkpoint

    cfg, model, optimizer = _tiny()
    run = tmp_path / "run"
    at_report: list[dict[str, bool]] = []
    trees: list[dict] = []

    def report(metrics: dict, checkpoint) -> None:
        at_report.append({p.parent.name: _holds_optimizer(p) for p in run.glob("checkpoint_*/checkpoint.pt")})
        trees.append(file_tree(run))
        shutil.copytree(checkpoint.path, run / f"checkpoint_2026-01-01_00-00-0{len(at_report)}.000000")

    def make() -> dict:
        return checkpoint_dict(model, cfg, TrainState(), optimizer=optimizer)

    for epoch, finished in enumerate((False, False, True)):
        report_with_checkpoint({"global_epoch": epoch, "finished": finished}, make, cfg, str(run), report)

    first, second, third = (f"checkpoint_2026-01-01_00-00-0{i}.000000" for i in (1, 2, 3))
    assert at_report == [{}, {first: True}, {first: False, second: False}]  # the newest kept it until then
    after = file_tree(run)
    assert {k: v for k, v in after.items() if not k.startswith(third)} == trees[-1]  # nothing moved after
    assert _holds_optimizer(run / third / "checkpoint.pt")  # the last keeps what a resume would need
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")]


def _holds_optimizer(path: Path) -> bool:
    return json.loads(Path(sidecar_location(path)).read_text())["optimizer"]
