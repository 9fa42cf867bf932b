"""Marthe inside the two trainers people use: PyTorch Lightning and the Hugging Face Trainer.

A few steps each on a tiny model built from code and sklearn's bundled digits (no
downloads), asserting that MARTHE's LR moved, that the trainer's LR logging saw it, and that
the training loss fell.
"""
import csv
import math

import pytest
import torch
import torch.nn.functional as F

import marthe_ext

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def digits():
    datasets = pytest.importorskip("sklearn.datasets", reason="scikit-learn provides the bundled digits")
    x, y = datasets.load_digits(return_X_y=True)
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y)


# ----------------------------------------------------------------------------- Lightning
def _lightning_module(L, x, y, automatic=True, **opt_kw):
    from marthe_ext.lightning import MartheAutomaticOptimization

    x = x / 16.0
    x_val, y_val = x[1200:], y[1200:]
    bases = (MartheAutomaticOptimization, L.LightningModule) if automatic else (L.LightningModule,)

    class Digits(*bases):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = automatic
            self.net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10))
            self.losses = []

        def forward(self, inputs):
            return self.net(inputs)

        def val_closure(self):
            return lambda: F.cross_entropy(self(x_val), y_val)

        def marthe_val_closure(self):
            return self.val_closure()

        def training_step(self, batch, batch_idx):
            inputs, labels = batch
            if automatic:
                loss = F.cross_entropy(self(inputs), labels)
                self.losses.append(float(loss))
                return loss
            loss = self.optimizers().step(closure=lambda: F.cross_entropy(self(inputs), labels),
                                          val_closure=self.val_closure())
            self.losses.append(float(loss))
            self.log("train_loss", loss)

        def configure_optimizers(self):
            return marthe_ext.Marthe(self.parameters(), lr=0.02, dynamics="adam", mu=0.99, **opt_kw)

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:1200], y[:1200]),
                                         batch_size=100, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    return Digits(), loader


def _fit(L, module, loader, tmp_path, **trainer_kw):
    from lightning.pytorch.callbacks import LearningRateMonitor
    from lightning.pytorch.loggers import CSVLogger

    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=CSVLogger(str(tmp_path)),
                        callbacks=[LearningRateMonitor("step")], enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=4,
                        **trainer_kw)
    trainer.fit(module, loader)
    with open(f"{trainer.logger.log_dir}/metrics.csv") as f:
        logged = [float(r["lr-Marthe"]) for r in csv.DictReader(f) if r.get("lr-Marthe")]
    return trainer, logged


def test_lightning_trains_with_marthe_automatic_and_manual_alike(digits, tmp_path):
    L = pytest.importorskip("lightning", reason="PyTorch Lightning is not installed")
    runs = {}
    for automatic in (True, False):
        torch.manual_seed(0)
        module, loader = _lightning_module(L, *digits, automatic=automatic)
        trainer, logged = _fit(L, module, loader, tmp_path / str(automatic))
        opt = trainer.optimizers[0]
        assert trainer.global_step == 24 and int(opt.hyper_state()["step"]) == 24  # a MARTHE step per batch
        assert opt.lr != pytest.approx(0.02, rel=1e-3)  # eta moved (measured 0.02 -> 0.0245)
        assert len(logged) >= 5 and max(logged) - min(logged) > 1e-4  # LearningRateMonitor saw it
        assert logged[-1] == pytest.approx(float(opt.param_groups[0]["lr"]), rel=0.05)
        first, last = sum(module.losses[:4]) / 4, sum(module.losses[-4:]) / 4
        assert math.isfinite(last) and last < 0.5 * first  # measured 2.2 -> 0.3
        runs[automatic] = (opt.lr, [p.detach().clone() for p in module.parameters()])
    # The mixin's automatic loop takes exactly the steps of the manual closure protocol.
    assert runs[True][0] == runs[False][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[True][1], runs[False][1]))


def test_lightning_automatic_refuses_gradient_accumulation(digits, tmp_path):
    L = pytest.importorskip("lightning", reason="PyTorch Lightning is not installed")
    module, loader = _lightning_module(L, *digits)
    with pytest.raises(RuntimeError, match="accumulate_grad_batches"):
        _fit(L, module, loader, tmp_path, accumulate_grad_batches=2)


def test_lightning_mixin_leaves_manual_backward_alone():
    L = pytest.importorskip("lightning", reason="PyTorch Lightning is not installed")
    from marthe_ext.lightning import MartheAutomaticOptimization

    class Module(MartheAutomaticOptimization, L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(3))

    module = Module()
    module.automatic_optimization = False
    module.backward((module.w ** 2).sum())  # what manual_backward calls
    assert torch.equal(module.w.grad, 2 * torch.ones(3)) and module._marthe_loss is None
    module.automatic_optimization = True
    module.backward((module.w ** 2).sum())
    assert torch.equal(module.w.grad, 2 * torch.ones(3)) and module._marthe_loss is not None


# ----------------------------------------------------------------------- Hugging Face
def _hf_setup(x, y, tmp_path, optimizer=marthe_ext.Marthe, **args_kw):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    pytest.importorskip("accelerate", reason="the transformers Trainer needs accelerate")
    from marthe_ext.hf_trainer import MartheTrainer

    pixels = (x / 16.0).reshape(-1, 1, 8, 8)

    class Digits(torch.utils.data.Dataset):
        def __len__(self):
            return 1280

        def __getitem__(self, i):
            return {"pixel_values": pixels[i], "labels": y[i]}

    torch.manual_seed(0)
    config = transformers.ViTConfig(  # a one-block ViT over 2x2 patches of the 8x8 digits
        image_size=8, patch_size=2, num_channels=1, hidden_size=32, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=64, num_labels=10, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0)
    config._attn_implementation = "eager"  # the CPU SDPA kernel has no double backward
    model = transformers.ViTForImageClassification(config)
    opt = optimizer(model.parameters(), lr=1e-2, dynamics="adamw")
    kw = dict(output_dir=str(tmp_path), per_device_train_batch_size=64, max_steps=80, max_grad_norm=0,
              logging_steps=10, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
              lr_scheduler_type="constant", seed=0)
    kw.update(args_kw)
    args = transformers.TrainingArguments(**kw)
    return MartheTrainer, dict(model=model, args=args, train_dataset=Digits(), optimizers=(opt, None)), opt


def test_hf_trainer_trains_with_marthe(digits, tmp_path):
    trainer_cls, kw, opt = _hf_setup(*digits, tmp_path)
    trainer = trainer_cls(**kw)
    trainer.train()  # mu = 0.99: every step after the first takes the HVP from the kept graph
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert int(opt.hyper_state()["step"]) == 80
    # the default's loss trust region (e) saw every step's training loss
    assert int(opt.hyper_state()["loss_count"]) == 80 and math.isfinite(float(opt.hyper_state()["loss_best"]))
    assert abs(opt.lr / 1e-2 - 1) > 1e-5  # eta moved (measured: 4e-4 relative)
    lrs = [h["learning_rate"] for h in logs]  # the Trainer's own logging of the LR
    assert max(lrs) != min(lrs) and lrs[-1] == pytest.approx(opt.lr, rel=1e-2)
    assert logs[-1]["loss"] < 0.85 * logs[0]["loss"]  # measured 0.76 (2.33 -> 1.77)


def test_plain_hf_trainer_works_with_hd_and_needs_the_subclass_for_an_hvp(digits, tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    _, kw, opt = _hf_setup(*digits, tmp_path, optimizer=marthe_ext.HD, max_steps=4,
                           lr_scheduler_type="linear")
    transformers.Trainer(**kw).train()  # mu = 0: .grad is all HD needs, and the scheduler
    assert int(opt.hyper_state()["step"]) == 4  # is the caller's (here the Trainer's LambdaLR)
    _, kw, _ = _hf_setup(*digits, tmp_path, max_steps=2)
    with pytest.raises(RuntimeError, match="create_graph=True"):
        transformers.Trainer(**kw).train()


def test_hf_trainer_hands_the_step_the_loss_summed_over_accumulation(digits, tmp_path):
    # HD (no graph kept) and 2 accumulated micro-batches: (e) sees the loss the Trainer logs,
    # the mean of the micro-batch losses (the Trainer divides each by 2 before backward).
    trainer_cls, kw, opt = _hf_setup(*digits, tmp_path, optimizer=marthe_ext.HD, max_steps=1,
                                     logging_steps=1, gradient_accumulation_steps=2)
    trainer = trainer_cls(**kw)
    trainer.train()
    state = opt.hyper_state()
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert int(state["loss_count"]) == 1 and len(logged) == 1
    seen = float(state["loss_avg"]) / (1 - 0.9)  # the first running mean, bias-corrected
    assert seen == pytest.approx(logged[0], rel=1e-4)


def test_hf_trainer_schedule_multiplies_eta(digits, tmp_path):
    # A warm-up (the Trainer's LambdaLR) on top of eta, not in place of it.
    trainer_cls, kw, opt = _hf_setup(*digits, tmp_path, max_steps=6, warmup_steps=4, logging_steps=1,
                                     lr_scheduler_type="constant_with_warmup")
    trainer = trainer_cls(**kw)
    trainer.train()
    assert abs(opt.lr / 1e-2 - 1) > 1e-7  # eta moved, so a schedule computed from lr=1e-2
    # would leave a factor 1e-2 / eta != 1 after the warm-up; following eta, it is 1 exactly
    assert float(opt.param_groups[0]["lr"]) / opt.lr == pytest.approx(1.0, rel=1e-12)
    lrs = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    warmup = [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]  # the factor each step used (the Trainer logs it)
    assert lrs == pytest.approx([f * 1e-2 for f in warmup], rel=1e-2)  # eta moves < 1 %


def test_hf_trainer_refuses_norm_clipping(digits, tmp_path):
    trainer_cls, kw, _ = _hf_setup(*digits, tmp_path, max_grad_norm=1.0)
    with pytest.raises(ValueError, match="max_grad_norm=0"):
        trainer_cls(**kw)
