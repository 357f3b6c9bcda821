"""`gss demo`: the models end to end on real local text, in a few minutes on a CPU.

Trains a small byte-level model on books from ../shared/corpora when that folder is there, else on
the Python standard library's own source (real text every machine has), then scores held-out text
at 1x, 2x and 4x the training length (zero-shot beyond it) and samples with recurrent decoding.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from models import PRESETS, build_model

SHARED_BOOKS = Path(__file__).resolve().parents[2] / "shared" / "corpora" / "pg19" / "train"


@dataclass
class DemoConfig:
    preset: str = "small-gss"
    corpus: str | None = None  # a folder of .txt/.py files or a glob; None: shared books, else stdlib
    max_bytes: int = 4_000_000
    steps: int = 400
    seq_len: int = 256
    batch_size: int = 8
    lr: float = 2e-3
    ssm_kernel: str = "fft"
    seed: int = 0


def default_corpus() -> str:
    if SHARED_BOOKS.is_dir():
        return str(SHARED_BOOKS / "*.txt")
    return str(Path(sysconfig.get_paths()["stdlib"]) / "*.py")


def read_corpus(pattern: str, max_bytes: int) -> bytes:
    if Path(pattern).is_dir():
        pattern = str(Path(pattern) / "*")
    files = sorted(p for p in glob.glob(pattern) if Path(p).is_file())
    if not files:
        raise SystemExit(f"no files match {pattern!r}: pass --corpus a folder or glob of text files")
    chunks, total = [], 0
    for path in files:
        data = Path(path).read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    return b"\n\n".join(chunks)[:max_bytes]


def bits_per_byte(model: torch.nn.Module, data: torch.Tensor, length: int, max_windows: int = 8) -> float:
    """Mean next-byte loss in bits over up to `max_windows` disjoint windows of `length` bytes."""
    windows = data[: (len(data) // (length + 1)) * (length + 1)].view(-1, length + 1)[:max_windows]
    if len(windows) == 0:
        return float("nan")
    with torch.no_grad():
        logits = model(windows[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    return loss.item() / math.log(2)


def run_demo(cfg: DemoConfig) -> dict[str, float]:
    torch.manual_seed(cfg.seed)
    if cfg.preset not in PRESETS:
        raise SystemExit(f"unknown preset {cfg.preset!r}; choose from {', '.join(PRESETS)}")
    source = cfg.corpus or default_corpus()
    data = torch.frombuffer(bytearray(read_corpus(source, cfg.max_bytes)), dtype=torch.uint8).long()
    split = int(0.95 * len(data))
    train, held_out = data[:split], data[split:]
    print(f"corpus: {source} ({len(data) / 1e6:.1f} MB; {len(held_out) / 1e3:.0f} kB held out)")

    model_cfg = dataclasses.replace(PRESETS[cfg.preset], vocab_size=256, ssm_kernel=cfg.ssm_kernel)
    model = build_model(model_cfg)
    print(f"model: {cfg.preset} ({model_cfg.arch}, {model.num_parameters() / 1e6:.2f}M parameters, bytes as tokens)")
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.1)

    start = time.perf_counter()
    progress = tqdm(range(cfg.steps), desc="train", unit="step")
    for _ in progress:
        offsets = torch.randint(0, len(train) - cfg.seq_len - 1, (cfg.batch_size,))
        batch = torch.stack([train[o : o + cfg.seq_len + 1] for o in offsets])
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 256), batch[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        progress.set_postfix(bits_per_byte=f"{loss.item() / math.log(2):.3f}")
    elapsed = time.perf_counter() - start
    tokens_per_s = cfg.steps * cfg.batch_size * cfg.seq_len / elapsed

    model.eval()
    results = {"train_tokens_per_s": tokens_per_s}
    print(f"\ntrained {cfg.steps} steps in {elapsed:.0f} s ({tokens_per_s:,.0f} bytes/s)")
    print("held-out bits per byte by evaluation length (zero-shot beyond the training length):")
    for factor in (1, 2, 4):
        length = factor * cfg.seq_len
        results[f"bpb@{length}"] = bits_per_byte(model, held_out, length)
        print(f"  {length:>6} bytes ({factor}x): {results[f'bpb@{length}']:.3f}")

    prompt = held_out[:64][None]
    sample = model.generate(prompt, max_new_tokens=200, temperature=0.8, top_k=40)[0]
    print("\nsample (recurrent decoding after a parallel prefill of the prompt):")
    print(bytes(prompt[0].tolist()).decode("utf-8", "replace") + "⟨" + bytes(sample[64:].tolist()).decode("utf-8", "replace"))
    return results
