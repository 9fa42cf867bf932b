"""MARTHE in PyTorch Lightning: an MLP on scikit-learn's bundled 8x8 digits (no downloads).

    python python/examples/lightning_example.py [--manual] [--epochs 3]

Automatic optimisation (the default) uses ``marthe_ext.lightning.MartheAutomaticOptimization``:
``training_step`` returns the loss as usual, and the mixin hands it to ``Marthe.step``,
which differentiates it itself (gradient and Hessian-vector product) and takes the
validation hypergradient from ``marthe_val_closure``. ``--manual`` shows manual
optimisation instead: ``self.optimizers().step(closure=..., val_closure=...)``.
Lightning's ``LearningRateMonitor`` logs MARTHE's LR (``param_groups[0]["lr"]``).
"""
import argparse
import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("marthe_ext") is None:  # a source checkout, not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger
from sklearn.datasets import load_digits

import marthe_ext
from marthe_ext.lightning import MartheAutomaticOptimization


def digits(n_train=1200):
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


class DigitsMLP(L.LightningModule):
    """The network, the validation data and the optimizer the two styles share."""

    def __init__(self, val, lr=0.02):
        super().__init__()
        self.x_val, self.y_val = val
        self.lr = lr
        self.net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 10))

    def forward(self, x):
        return self.net(x)

    def configure_optimizers(self):
        return marthe_ext.Marthe(self.parameters(), lr=self.lr, dynamics="adam", mu=0.99)


class Classifier(MartheAutomaticOptimization, DigitsMLP):
    """Automatic optimisation: the mixin routes the loss to Marthe's closure protocol."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def marthe_val_closure(self):  # MARTHE's validation mode: h from grad E(w_{t+1})
        return lambda: F.cross_entropy(self(self.x_val), self.y_val)


class ManualClassifier(DigitsMLP):
    """Manual optimisation: call the optimizer's step with MARTHE's closures yourself."""

    def __init__(self, val, lr=0.02):
        super().__init__(val, lr)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.optimizers().step(closure=lambda: F.cross_entropy(self(x), y),
                                      val_closure=lambda: F.cross_entropy(self(self.x_val), self.y_val))
        self.log("train_loss", loss, prog_bar=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--manual", action="store_true", help="manual optimisation instead of automatic")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--logdir", default="lightning_logs_marthe")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    train, val = digits()
    model = (ManualClassifier if args.manual else Classifier)(val)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*train), batch_size=100, shuffle=True)
    trainer = L.Trainer(max_epochs=args.epochs, accelerator="cpu", logger=CSVLogger(args.logdir),
                        callbacks=[LearningRateMonitor("step")], enable_checkpointing=False,
                        log_every_n_steps=4)
    trainer.fit(model, loader)
    opt = trainer.optimizers[0]
    with torch.no_grad():
        val_loss = float(F.cross_entropy(model(val[0]), val[1]))
    print(f"steps {trainer.global_step}: MARTHE's LR 0.02 -> {opt.lr:.4g}, validation loss {val_loss:.3f}; "
          f"metrics (train_loss, lr-Marthe) in {trainer.logger.log_dir}/metrics.csv")


if __name__ == "__main__":
    main()
