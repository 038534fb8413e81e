"""wandb through the CLI, offline: the run's .wandb file holds the metrics, config and media."""

import csv
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from lightning.pytorch.loggers import CSVLogger
from wandb.proto import wandb_internal_pb2

from iopfl_lightning import tracking
from tests.helpers import TINY_CONFIGS, run_cli

WANDB_ENV = ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_MODE", "WANDB_BASE_URL")


@pytest.fixture
def no_credentials(tmp_path, monkeypatch):
    """No key, no mode, an empty netrc; every wandb folder inside tmp_path."""
    for name in WANDB_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb_home"))
    return tmp_path


def read_records(path: Path) -> list:
    """Records of a .wandb file (wandb's LevelDB-style log: 32 KiB blocks, 7-byte headers)."""
    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", path
    records, pos, partial = [], 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if left < 7 or kind == 0:  # block trailer or padding
            pos += left
            continue
        if pos + 7 + length > len(data):  # wandb is still writing this record: read it later
            break
        partial += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a FULL record or the LAST piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(partial)
            records.append(record)
            partial = b""
    return records


def finished_records(path: Path, timeout: float = 20.0) -> list:
    """The records once wandb's service has written the run's exit record (it writes the
    file asynchronously, shortly after ``finish`` returns)."""
    deadline = time.monotonic() + timeout
    while True:
        records = read_records(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} has no exit record after {timeout} s")
        time.sleep(0.2)


def _history(records) -> dict[str, str]:
    items = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items.update({"/".join(i.nested_key) or i.key: i.value_json
                          for i in record.history.item})
    return items


def test_offline_unless_credentials_or_a_mode(no_credentials, monkeypatch):
    assert tracking.resolve_mode(None) == "offline" and tracking.resolve_mode(True) == "offline"
    assert tracking.resolve_mode(False) is None
    (no_credentials / "netrc").write_text("machine api.wandb.ai login user password abc123\n")
    assert tracking.credentials_configured() and tracking.resolve_mode(None) is None
    (no_credentials / "netrc").unlink()
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert tracking.resolve_mode(None) is None
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert tracking.resolve_mode(None) is None


def test_without_wandb_every_hook_is_a_no_op(tmp_path):
    trainer = SimpleNamespace(loggers=[CSVLogger(tmp_path)])
    assert tracking.wandb_logger(trainer) is None and tracking.wandb_logger(None) is None
    tracking.log_config(trainer, {"model": {}})
    tracking.log_test_report(trainer, [{"site": "A", "model": "global"}], {})
    tracking.finish(trainer)
    assert list(tmp_path.iterdir()) == []


def test_cli_fit_logs_metrics_config_table_and_pictures_offline(no_credentials):
    root = no_credentials / "runs"
    cli = run_cli(["fit", "--config", str(TINY_CONFIGS / "demo_tiny.yaml"),
                   "--trainer.max_epochs", "1",
                   "--trainer.logger", "iopfl_lightning.tracking.WandbRunLogger",
                   "--trainer.logger.init_args.project", "iopfl-test",
                   "--trainer.logger.init_args.settings", '{"x_disable_stats": true}'], root)
    folder = Path(cli.trainer.log_dir)
    assert folder == root / "version_0"  # the CSVLogger run folder, as with CSVLogger
    assert {"results.csv", "config.yaml", "site_bars.png", "overlays.png", "metrics.csv"} <= {
        p.name for p in folder.iterdir()}
    (run,) = (folder / "wandb").glob("offline-run-*")
    records = finished_records(next(run.glob("*.wandb")))
    history = _history(records)
    with open(folder / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        logged = float(history[f"test/{row['site']}/{row['model']}/dice"])
        assert logged == pytest.approx(float(row["dice"]), abs=1e-6)
    assert history["test/results/_type"] == '"table-file"'
    assert history["test/results/nrows"] == str(len(rows))
    assert history["test/overlays/_type"] == '"images/separated"' and "test/site_bars/count" in history
    config_keys = {u.key for r in records if r.WhichOneof("record_type") == "config"
                   for u in r.config.update}
    assert {"trainer", "model", "data", "lr", "overlay_cases"} <= config_keys
    media = {p.parent.name + "/" + p.name.split("_")[0] for p in (run / "files" / "media").rglob("*.*")}
    assert {"test/results", "test/site", "test/overlays"} <= media


def test_a_used_run_folder_is_refused_before_its_metrics_are_touched(tmp_path):
    tracking.refuse_used_run_folder(tmp_path)  # empty: a new run may start here
    (tmp_path / "metrics.csv").write_text("epoch,step\n0,1\n")
    with pytest.raises(RuntimeError, match=r"already holds a run \(metrics.csv\)"):
        tracking.refuse_used_run_folder(tmp_path)
    assert (tmp_path / "metrics.csv").read_text() == "epoch,step\n0,1\n"
    logger = tracking.WandbRunLogger(str(tmp_path.parent), name=tmp_path.name, version="",
                                     offline=True)
    assert Path(logger.log_dir) == tmp_path
    with pytest.raises(RuntimeError, match="already holds a run"):
        logger.experiment  # noqa: B018 (the property is what is tested)
    assert (tmp_path / "metrics.csv").is_file()


def test_a_second_experiment_in_one_process_gets_its_own_run(no_credentials):
    """As in a notebook: the first experiment's run is still open (only the CLI closes it);
    the second logs into a run of its own, named after its own folder."""
    from tests.helpers import tiny_datamodule, tiny_module, tiny_trainer

    runs = []
    for name in ("first", "second"):
        logger = tracking.WandbRunLogger(save_dir=str(no_credentials / "runs"), name=name)
        trainer = tiny_trainer(1, [], no_credentials, logger=logger, limit_train_batches=1,
                               limit_val_batches=1)
        trainer.fit(tiny_module(), datamodule=tiny_datamodule())
        runs.append(logger.wandb.experiment)
    try:
        assert runs[0].id != runs[1].id
        assert [r.name for r in runs] == ["first/version_0", "second/version_0"]
        assert Path(runs[1].dir).is_relative_to(no_credentials / "runs" / "second")
    finally:
        for run in runs:
            run.finish()
