from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

from iopfl_lightning.federated import FederatedTrainer
from tests.helpers import tiny_datamodule, tiny_module, tiny_trainer


def test_progress_bar_names_round_and_site(tmp_path):
    seen = []

    class Recording(TQDMProgressBar):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(self.train_progress_bar.desc)
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    dm = tiny_datamodule()
    trainer = tiny_trainer(1, [FederatedTrainer(), Recording()], tmp_path,
                           enable_progress_bar=True, limit_val_batches=0)
    trainer.fit(tiny_module(), datamodule=dm)
    assert {d.rstrip(": ") for d in seen} == {f"Round 0 · site {s}" for s in dm.inside_sites}


def test_rich_progress_bar_names_round_and_site(tmp_path):
    """Rich is Lightning's default bar when rich is installed (as with `make demo`)."""
    seen = []

    class Recording(RichProgressBar):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(self.progress.tasks[self.train_progress_bar_id].description)
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    dm = tiny_datamodule()
    trainer = tiny_trainer(1, [FederatedTrainer(), Recording()], tmp_path,
                           enable_progress_bar=True, limit_val_batches=0)
    trainer.fit(tiny_module(), datamodule=dm)
    assert set(seen) == {f"Round 0 · site {s}" for s in dm.inside_sites}
