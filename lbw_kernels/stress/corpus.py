"""Text corpora for the stress runs, as bytes, with a held-out validation split.

The default corpus needs no download: the Python standard library's own ``.py`` source files,
found through ``sysconfig.get_paths()["stdlib"]``, in sorted order of their relative paths
(``site-packages`` left out, so it does not depend on what is installed). ``--corpus PATH``
takes a text file or a folder (every file under it, sorted) instead.

Splits are disjoint by construction: with several files, every ``val_every``-th file (in the
sorted order) is held out whole; a single file is split by bytes (the last ``val_fraction``).
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import torch


@dataclass
class Corpus:
    train: torch.Tensor  # uint8 bytes
    val: torch.Tensor
    source: str
    train_files: List[str]
    val_files: List[str]

    @property
    def fingerprint(self) -> str:
        """Identifies the exact bytes of both splits (keys the cached base model)."""
        h = hashlib.sha256()
        h.update(self.train.numpy().tobytes())
        h.update(b"|")
        h.update(self.val.numpy().tobytes())
        return h.hexdigest()[:16]


def stdlib_files() -> List[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def folder_files(root: Path) -> List[Path]:
    files = [p for p in root.rglob("*") if p.is_file()]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _take(files: Sequence[Path], budget: Optional[int]) -> tuple:
    chunks, names, total = [], [], 0
    for path in files:
        if budget is not None and total >= budget:
            break
        data = path.read_bytes()
        if budget is not None:
            data = data[: budget - total]
        if data:
            chunks.append(data)
            names.append(str(path))
            total += len(data)
    joined = b"\n".join(chunks)
    return (joined if budget is None else joined[:budget]), names


def _as_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone() if data else torch.zeros(0, dtype=torch.uint8)


def load_corpus(
    path: Optional[str] = None,
    max_train_bytes: Optional[int] = None,
    max_val_bytes: Optional[int] = None,
    val_every: int = 10,
    val_fraction: float = 0.1,
) -> Corpus:
    """The corpus at ``path`` (file or folder), or the standard library's sources when None.

    ``max_*_bytes`` cap each split, taking files in order. Raises FileNotFoundError naming the
    path when it does not exist, and ValueError when a split would be empty.
    """
    if path is None:
        files, source = stdlib_files(), f"python stdlib ({sysconfig.get_paths()['stdlib']})"
    else:
        p = Path(path).expanduser()
        if not p.exists():
            raise FileNotFoundError(f"--corpus {path}: no such file or folder ({p.resolve()})")
        files, source = ([p] if p.is_file() else folder_files(p)), str(p)
    if not files:
        raise ValueError(f"corpus {source}: no files found")
    if len(files) >= 2:
        val_idx = set(range(val_every - 1, len(files), val_every)) or {len(files) - 1}
        train_files = [f for i, f in enumerate(files) if i not in val_idx]
        val_files = [f for i, f in enumerate(files) if i in val_idx]
        train, train_names = _take(train_files, max_train_bytes)
        val, val_names = _take(val_files, max_val_bytes)
    else:
        data = files[0].read_bytes()
        cut = int(len(data) * (1 - val_fraction))
        train, val = data[:cut], data[cut:]
        if max_train_bytes is not None:
            train = train[:max_train_bytes]
        if max_val_bytes is not None:
            val = val[:max_val_bytes]
        train_names = val_names = [str(files[0])]
    if not train or not val:
        raise ValueError(f"corpus {source}: too small to split into train and validation")
    return Corpus(_as_tensor(train), _as_tensor(val), source, train_names, val_names)


def batch_offsets(n_bytes: int, ctx: int, batch: int, steps: int, seed: int) -> torch.Tensor:
    """``[steps, batch]`` start offsets: the batch order, fixed by the seed alone so that every
    arm sees the same batches in the same order."""
    if n_bytes <= ctx + 1:
        raise ValueError(f"training split has {n_bytes} bytes, needs more than ctx+1 = {ctx + 1}")
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_bytes - ctx - 1, (steps, batch), generator=gen)


def windows(data: torch.Tensor, offsets: torch.Tensor, ctx: int) -> tuple:
    """Inputs and next-byte targets ``[len(offsets), ctx]`` (int64) at ``offsets``."""
    idx = offsets[:, None] + torch.arange(ctx + 1)[None, :]
    chunk = data[idx].long()
    return chunk[:, :-1], chunk[:, 1:]


def val_offsets(n_bytes: int, ctx: int, count: int) -> torch.Tensor:
    """Evenly spaced validation windows (deterministic, no randomness)."""
    if n_bytes <= ctx + 1:
        raise ValueError(f"validation split has {n_bytes} bytes, needs more than ctx+1 = {ctx + 1}")
    last = n_bytes - ctx - 1
    count = max(1, min(count, last + 1))
    return torch.linspace(0, last, count).long()
