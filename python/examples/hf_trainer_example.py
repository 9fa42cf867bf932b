"""MARTHE in the Hugging Face ``transformers`` Trainer: a one-block ViT, built from its config,
on scikit-learn's bundled 8x8 digits (no downloads).

    python python/examples/hf_trainer_example.py [--steps 200] [--warmup 20]

``marthe_ext.hf_trainer.MartheTrainer`` is the Trainer with three changes: its backward
keeps the graph MARTHE's Hessian-vector product needs (``create_graph=True``), its
default schedule multiplies MARTHE's eta instead of replacing it (``follow_eta``), and it
refuses ``max_grad_norm`` (norm clipping that MARTHE's tangent does not model). The
optimizer is passed as ``optimizers=(Marthe(...), None)``. The Trainer calls
``optimizer.step()`` with no arguments, so the hypergradient comes from the training
loss (MARTHE's train mode).
"""
import argparse
import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("marthe_ext") is None:  # a source checkout, not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
import transformers
from sklearn.datasets import load_digits

import marthe_ext
from marthe_ext.hf_trainer import MartheTrainer


class Digits(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20, help="warm-up steps (a factor on top of eta)")
    ap.add_argument("--output-dir", default="hf_trainer_marthe")
    args = ap.parse_args(argv)

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(y)
    train, val = Digits(x[:1400], y[:1400]), Digits(x[1400:], y[1400:])

    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=32,
                                    num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                    num_labels=10, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config._attn_implementation = "eager"  # torch's CPU SDPA kernel has no double backward
    model = transformers.ViTForImageClassification(config)
    opt = marthe_ext.Marthe(model.parameters(), lr=1e-2, dynamics="adamw", mu=0.99)
    training_args = transformers.TrainingArguments(
        output_dir=args.output_dir, per_device_train_batch_size=64, max_steps=args.steps,
        warmup_steps=args.warmup, lr_scheduler_type="constant_with_warmup", max_grad_norm=0,
        logging_steps=max(1, args.steps // 10), eval_strategy="steps", eval_steps=max(1, args.steps // 4),
        per_device_eval_batch_size=256, report_to=[], save_strategy="no", use_cpu=True)
    trainer = MartheTrainer(model=model, args=training_args, train_dataset=train, eval_dataset=val,
                            optimizers=(opt, None))
    trainer.train()
    print(f"MARTHE's eta 0.01 -> {opt.lr:.4g}; final eval loss {trainer.evaluate()['eval_loss']:.3f}")


if __name__ == "__main__":
    main()
